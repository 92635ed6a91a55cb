"""Tripwires for ftkit/patches.py: each test checks that the library still behaves the way that made a patch
necessary. When one fails, the library has caught up: delete the patch and its test (the table at the top of
ftkit/patches.py says which is which)."""

import dataclasses
import importlib.util
import inspect
import io
import re

import torch

from ftkit import patches


def test_transformers_has_no_tiled_mlp():
    # transformers 5.17 runs each MLP over the whole sequence; the tiled MLP and offloaded checkpoints swap
    # decoder module classes to bound long-row memory (tests/test_long_rows.py checks the numbers stay equal)
    from transformers.models.llama.modeling_llama import LlamaMLP

    assert importlib.util.find_spec("transformers.integrations.tiled_mlp") is None
    assert list(inspect.signature(LlamaMLP.forward).parameters) == ["self", "x"]


def test_torch_still_refuses_indexed_cpu_locations():
    buf = io.BytesIO()
    torch.save({"m": torch.ones(2)}, buf)

    def load():
        buf.seek(0)
        return torch.load(buf, map_location="cpu:1", weights_only=True)

    import torch.serialization as ser

    if not getattr(ser, "_ftkit_cpu_index", False):  # this process has not patched it yet
        try:
            load()
            raise AssertionError("torch now loads map_location='cpu:1': allow_indexed_cpu_locations can go")
        except RuntimeError as e:
            assert "cpu:1" in str(e)
    patches.allow_indexed_cpu_locations()
    assert torch.equal(load()["m"], torch.ones(2))


def test_callbacks_still_do_not_see_the_batch():
    from transformers import TrainerCallback

    for hook in ("on_step_begin", "on_substep_end", "on_step_end"):
        params = inspect.signature(getattr(TrainerCallback, hook)).parameters
        assert "inputs" not in params and "batch" not in params


def test_first_batch_logging_keeps_the_collators_class():
    seen = []

    class Collator:
        def __call__(self, features):
            return len(features)

    c = Collator()
    patches.log_first_batch(c, seen.append)
    assert isinstance(c, Collator) and c([{"input_ids": [1, 2]}, {"input_ids": [3]}]) == 2
    c([{"input_ids": [4]}])
    assert len(seen) == 1 and len(seen[0]) == 2  # once, one hash per row


def test_trl_still_casts_qlora_adapters_to_bf16():
    from trl import SFTTrainer

    src = inspect.getsource(SFTTrainer.__init__)
    assert "param.data = param.data.to(torch.bfloat16)" in src, (
        "TRL no longer casts QLoRA adapters: keep_lora_fp32 can go"
    )


def test_keep_lora_fp32_recasts_only_trainable_tensors():
    m = torch.nn.Linear(2, 2).to(torch.bfloat16)
    m.bias.requires_grad_(False)
    assert patches.keep_lora_fp32(m) == 1
    assert m.weight.dtype == torch.float32 and m.bias.dtype == torch.bfloat16


def test_trl_still_copies_the_adapter_as_reference():
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    for trainer in (DPOTrainer, KTOTrainer, GRPOTrainer):
        src = inspect.getsource(trainer.__init__)
        assert 'model.add_adapter("ref", default_config)' in src, (
            f"{trainer.__name__} no longer copies a PEFT model's adapter as its reference: "
            "drop_reference_adapter_copy can go"
        )
        # ... and still falls back to the adapter disabled when there is no "ref" adapter
        assert '"ref" if "ref" in' in inspect.getsource(trainer)


def test_drop_reference_adapter_copy_leaves_only_the_trained_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
    m.add_adapter("ref", m.peft_config["default"])
    assert patches.drop_reference_adapter_copy(m)
    assert list(m.peft_config) == ["default"] and not any(".ref." in n for n, _ in m.named_parameters())
    assert not patches.drop_reference_adapter_copy(m)


def test_grpo_samples_in_one_method():
    """time_calls' subject: GRPOTrainer samples every completion of a step through _generate, called from the step's
    input preparation; the benchmark's split of a step into sampling and the rest is only as right as that."""
    from trl import GRPOTrainer

    assert "self._generate(prompts)" in inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "_generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)

    class Box:
        def work(self, x):
            return x * 2

    box, sink = Box(), {}
    patches.time_calls(box, "work", sink)
    assert box.work(3) == 6 and box.work(4) == 8 and len(sink["work"]) == 2 and all(t >= 0 for t in sink["work"])
    assert Box().work(1) == 2  # the class is untouched


def test_trl_experimental_orpo_and_cpo_still_fit():
    """ftkit/experimental.py's pin: the names, and the options finetune.py passes them."""
    import dataclasses

    import trl

    from ftkit import experimental

    assert trl.__version__ == experimental.PINNED_TRL, "TRL moved: re-check trl.experimental's ORPO/CPO, then re-pin"
    orpo = {f.name for f in dataclasses.fields(experimental.ORPOConfig)}
    cpo = {f.name: f for f in dataclasses.fields(experimental.CPOConfig)}
    assert {"beta", "max_length", "remove_unused_columns"} <= orpo
    assert {"beta", "simpo_gamma", "cpo_alpha", "loss_type"} <= set(cpo)
    assert "simpo" in cpo["loss_type"].metadata["choices"]
    for trainer in (experimental.ORPOTrainer, experimental.CPOTrainer):
        params = inspect.signature(trainer.__init__).parameters
        assert {"model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks"} <= set(params)


def test_the_configs_loss_types_are_trls():
    from trl import DPOConfig, GRPOConfig, KTOConfig

    from ftkit.config import LOSS_TYPES

    dpo_help = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"].metadata["help"]
    assert set(LOSS_TYPES["dpo"]) == set(re.findall(r"`'([a-z_]+)'`", dpo_help))
    kto = {f.name: f for f in dataclasses.fields(KTOConfig)}["loss_type"]
    assert set(LOSS_TYPES["kto"]) == set(kto.metadata["choices"])
    # GRPO's: all TRL names but luspo, which needs importance_sampling_level=sequence (not an option here)
    grpo_help = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"].metadata["help"]
    supported = grpo_help.split("Supported values are ")[1].split(".")[0]
    assert set(LOSS_TYPES["grpo"]) | {"luspo"} == set(re.findall(r"'([a-z_]+)'", supported))
