"""Tripwires for ftkit/patches.py: each test checks that the library still behaves the way that made a patch
necessary. When one fails, the library has caught up: delete the patch and its test (the table at the top of
ftkit/patches.py says which is which)."""

import importlib.util
import inspect
import io

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
