"""Long rows: the tiled MLP and the offloaded checkpoints change where activations live, never the numbers;
and the "auto" switches turn them on only when the longest micro-batch would not fit
(ftkit/plan.py, ftkit/patches.py)."""

import pytest
import torch
from helpers import REPO, run_script, tiny_overrides

from ftkit import patches
from ftkit.config import load_config
from ftkit.errors import UserError
from ftkit.estimate import REFERENCE_MODEL, StepShape, estimate, model_numbers
from ftkit.plan import Hardware, make_plan

H200 = ("NVIDIA H200", 150e9)
# the linear layers the benchmarks put LoRA on (benchmarks/train_throughput.py)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(layers=3):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    )
    model.train()
    return model


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tiled_mlp_and_offloading_give_the_same_loss_and_gradients(monkeypatch, device):
    model = lora_llama().to(device)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1)).to(device)
    ref_loss, ref = loss_and_grads(model, ids)

    seen = []  # token counts reaching the MLP's first projection
    for layer in patches.decoder_layers(model):
        layer.mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[-2]))
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def counting(*a, **kw):
        entered.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)

    assert patches.use_tiled_mlp(model, chunk_tokens=48) == 3
    assert patches.offload_layer_inputs(model, 2) == 2
    assert [type(x).__name__ for x in patches.decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    loss, grads = loss_and_grads(model, ids)

    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # 200 tokens in chunks of 48: 5 chunks; each MLP runs chunk by chunk in the forward and again in the
    # backward (torch's checkpoint may skip a recompute whose results are no longer needed): never whole
    assert max(seen) == 48 and len(seen) >= 3 * 2 * 5
    assert len(entered) == 2  # two layers' forwards ran under save_on_cpu
    # generation (no grad) takes the untouched path
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    # and both are undone in place, as a benchmark reusing the loaded model needs
    patches.unwrap_calls(model)
    swapped = [m for m in model.modules() if hasattr(type(m), "_ftkit_tiled") or hasattr(type(m), "_ftkit_offload")]
    assert not swapped


def planned(tokens: int, device="cuda", host=120e9, **over):
    cfg = load_config(
        REPO / "configs" / "llama3_alpaca_h200.yaml",
        [
            "train.packing=false",
            "train.per_device_train_batch_size=1",
            "train.use_liger_kernel=true",
            "train.gradient_accumulation_steps=1",
            *[f"{k}={v}" for k, v in over.items()],
        ],
    )
    from transformers import LlamaConfig

    hw = Hardware(device=device, gpu_name=H200[0], gpu_memory=H200[1], liger_installed=True, host_memory=host)
    return cfg, make_plan(cfg, hw, [tokens], LlamaConfig(**REFERENCE_MODEL), eval_rows=20)


def test_auto_switches_follow_the_longest_row():
    _, short = planned(2048)
    assert (short.gradient_checkpointing, short.tiled_mlp, short.offload_layers) == (False, False, 0)
    _, mid = planned(120_000)  # fits with checkpointing alone
    assert (mid.gradient_checkpointing, mid.tiled_mlp, mid.offload_layers) == (True, False, 0)
    _, longer = planned(300_000)  # needs the tiled MLP too
    assert (longer.gradient_checkpointing, longer.tiled_mlp, longer.offload_layers) == (True, True, 0)
    cfg, long = planned(500_000)
    assert long.gradient_checkpointing and long.tiled_mlp
    assert 0 < long.offload_layers < 32
    est = long.estimate_largest
    assert est["predicted_peak_gb"] <= 0.85 * 150
    assert est["host_offload_gb"] > 0
    # the plan, not the config, records the number of layers chosen (plan.json), and says why
    assert cfg.train.activation_offloading == "auto"
    assert any(c.key == "train.activation_offloading" and c.planned == long.offload_layers for c in long.changes)
    # one layer fewer would not fit
    fewer = estimate(
        model_numbers(__import__("transformers").LlamaConfig(**REFERENCE_MODEL), 16, TARGETS),
        StepShape(
            500_000, 1, True, True, 500_000, tiled_mlp=True, offload_layers=long.offload_layers - 1, optim_state_bytes=2
        ),
        "NVIDIA H200",
    )
    assert fewer["predicted_peak_gb"] > 0.85 * 150


def test_offloading_refuses_what_the_host_cannot_hold():
    with pytest.raises(UserError, match="CPU RAM"):
        planned(500_000, host=8e9)


def test_a_plan_that_cannot_fit_is_refused():
    # 4M tokens: even every layer offloaded leaves too much on the GPU
    with pytest.raises(UserError, match="does not fit this GPU"):
        planned(4_000_000, host=None)


def test_offloading_needs_cuda_and_checkpointing():
    with pytest.raises(UserError, match="train.activation_offloading=true needs a CUDA GPU"):
        planned(1000, device="cpu", **{"train.activation_offloading": "true", "train.use_liger_kernel": "auto"})
    with pytest.raises(UserError, match="train.tiled_mlp=true needs gradient checkpointing"):
        load_config(REPO / "configs" / "demo.yaml", ["train.tiled_mlp=true", "train.gradient_checkpointing=false"])
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["train.activation_offloading=3", "train.gradient_checkpointing=auto"]
    )
    assert cfg.train.activation_offloading == 3


def test_finetune_with_tiled_mlp_on_cpu(tmp_path, tiny_llama, alpaca_file):
    run = tmp_path / "run"
    r = run_script(
        "finetune.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(
            tiny_llama,
            alpaca_file,
            run,
            **{"train.max_steps": 2, "train.tiled_mlp": "true", "train.gradient_checkpointing": "true"},
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiled MLP: 2 layers run their MLP in chunks of 64 tokens" in r.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_dry_run_plans_for_the_longest_row(tmp_path, embedded_model):
    """`finetune.py --dry-run` on the Llama-3-8B shape (config only: the dry run reads no weights) and one
    350k-token row: it turns on checkpointing, the tiled MLP and offloading of some layers, and prints the plan
    for the largest micro-batch within the GPU budget."""
    import json

    from transformers import AutoTokenizer, LlamaConfig

    model = tmp_path / "llama3-8b-shape"
    LlamaConfig(**REFERENCE_MODEL).save_pretrained(model)
    AutoTokenizer.from_pretrained(embedded_model).save_pretrained(model)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    text = " ".join(words[i % len(words)] + str(i % 97) for i in range(120_000))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "Summarise.", "input": text, "output": "A fox."}) + "\n")
    r = run_script(
        "finetune.py",
        "--config",
        "configs/llama3_alpaca_h200.yaml",
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.eval_size=0",
        "data.max_length=1000000",
        "train.packing=false",
        "train.per_device_train_batch_size=1",
        "train.gradient_accumulation_steps=1",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "gradient_checkpointing=True" in out and "tiled_mlp=True" in out, out
    assert (
        "per-device batch 1 x accumulation 1 x 1 processes = global batch 1 rows a step" in out
        and "train.activation_offloading: auto ->" in out
    ), out
    assert not (model / "plan.json").exists() and not any(tmp_path.glob("runs*"))  # a dry run writes nothing
    layers = int(out.split("offloaded_layers=")[1].split()[0])
    assert 0 < layers < 32, out
    peak = float(out.split("predicted peak GPU memory ")[1].split()[0])
    assert peak <= 0.85 * 150.1 and "offloaded checkpoints:" in out, out
