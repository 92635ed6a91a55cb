"""The calibrated memory and speed model of one optimizer step (peak GPU memory, seconds a step), from a
model's config and the shape of its micro-batches; behind the training plan's choices and `--dry-run`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# -- the estimate behind --dry-run ------------------------------------------------------------------
# Constants measured on one NVIDIA H200 (benchmarks/results/h200_*.json; benchmarks/README.md says how they
# were fitted). Memory is torch.cuda.max_memory_allocated. Time per optimizer step is modelled as
#     n_micro * overhead + tokens * flops_per_token / rate + attention_flops / attn_rate
# where flops_per_token is 4N (no recompute: forward + input gradients; the 4-bit base has no weight
# gradients) or 6N (gradient checkpointing recomputes the forward), N the parameter count.
CALIB = {
    "NVIDIA H200": {
        "peak_tflops": 790.0,  # measured bf16 dense matmul (KINDS.md); the MFU denominator
        "rate_tflops": 479.0,  # achieved on the model's linear work, 4-bit dequantization included
        "gpu_fixed_s": {"gc": 0.06, "nogc": 0.039},  # per micro-batch: dequantizing 7B weights and the like
        # per micro-batch: the host issuing ~10k kernels (bitsandbytes, PEFT, liger); the GPU waits on it
        # when the micro-batch is small
        "cpu_floor_s": {"gc": 0.50, "nogc": 0.41},
        "attn_tflops": 266.0,  # varlen flash attention, forward + backward
        # activation bytes per token, per layer and hidden unit: without checkpointing everything a layer
        # keeps for backward; with it, the bf16 layer input plus one layer's working set (gc_layer_h)
        "act_per_layer_h": {"gc": 2.0, "nogc": 37.6},
        "gc_layer_h": 51.2,
        # the same working set with the MLP run in chunks (train.tiled_mlp), and what stays on the GPU per
        # token once layer inputs are offloaded (copies in flight); fitted on 16k-131k-token rows
        # (benchmarks/results/h200_long.json)
        "gc_layer_h_tiled": 23.6,
        "offload_extra_h": 4.4,
        # host <-> GPU for the offloaded checkpoints, each way, as measured in one-step probes (synchronous
        # copies plus the first allocation of pinned memory)
        "offload_gb_per_s": 3.5,
        "logit_bytes_liger": 0.0,
        "logit_bytes": 14.0,  # per token and vocabulary entry without liger (not fitted)
        "static_extra_gb": 0.0,
    },
}
DEFAULT_GPU = "NVIDIA H200"
# The model the constants were fitted on, Llama 3 8B (a transformers LlamaConfig's keyword arguments): what the
# benchmarks build and what the plan's tests predict for.
REFERENCE_MODEL = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
)
# What the plan assumes of the reference GPU where there is none (CPU runs, --dry-run on a laptop).
REFERENCE_GPU_MEMORY = 139 * 2**30
# The share of GPU memory the "auto" switches plan to fill; the rest absorbs fragmentation and the estimate's error.
GPU_MEMORY_FRACTION = 0.85


@dataclass
class StepShape:
    """What one optimizer step does, in the terms the estimate needs."""

    tokens_per_micro: float  # real tokens in one micro-batch (padded ones count when padding)
    micro_per_step: int
    gradient_checkpointing: bool
    liger: bool
    mean_row_len: float  # for the attention term
    lora_dtype_bytes: int = 2  # TRL keeps QLoRA adapters in bf16
    upcast_fp32: bool = False
    optim_state_bytes: int = 8  # two fp32 AdamW moments; 2 for 8-bit optimizers
    tiled_mlp: bool = False
    offload_layers: int = 0  # decoder layers whose checkpointed inputs live in CPU RAM


def model_numbers(mconf, lora_r: int, targets) -> dict:
    h, nl, inter, vocab = mconf.hidden_size, mconf.num_hidden_layers, mconf.intermediate_size, mconf.vocab_size
    heads = mconf.num_attention_heads
    kv = getattr(mconf, "num_key_value_heads", heads) or heads
    hd = getattr(mconf, "head_dim", None) or h // heads
    shapes = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    linear = nl * sum(a * b for a, b in shapes.values())
    tgt = shapes if targets == "all-linear" else {k: v for k, v in shapes.items() if k in targets}
    lora = nl * lora_r * sum(a + b for a, b in tgt.values())
    tied = bool(getattr(mconf, "tie_word_embeddings", False))
    embed = vocab * h * (1 if tied else 2)
    mlp = nl * sum(a * b for k, (a, b) in shapes.items() if k.endswith(("gate_proj", "up_proj", "down_proj")))
    return {
        "hidden": h,
        "layers": nl,
        "vocab": vocab,
        "head_dim": hd,
        "heads": heads,
        "linear": linear,
        "embed": embed,
        "lora": lora,
        "params": linear + embed + nl * 2 * h + h,
        "mlp_share": mlp / linear,
    }


def estimate(nums: dict, shape: StepShape, gpu: str = DEFAULT_GPU) -> dict:
    c = CALIB.get(gpu) or CALIB[DEFAULT_GPU]
    mode = "gc" if shape.gradient_checkpointing else "nogc"
    h, nl = nums["hidden"], nums["layers"]
    # static: NF4 weights (0.5 byte + double-quantized absmax, ~0.127 bit), bf16 (or fp32) embeddings and
    # head, LoRA weights + their gradients + two fp32 AdamW moments
    static = nums["linear"] * (0.5 + 0.127 / 8) + nums["embed"] * (4 if shape.upcast_fp32 else 2)
    static += nums["lora"] * (2 * shape.lora_dtype_bytes + shape.optim_state_bytes)
    t = shape.tokens_per_micro
    host = 0.0
    if shape.gradient_checkpointing:
        on_gpu = nl - shape.offload_layers
        layer = c["gc_layer_h_tiled"] if shape.tiled_mlp else c["gc_layer_h"]
        act = t * (
            on_gpu * c["act_per_layer_h"]["gc"] * h
            + layer * h
            + (c["offload_extra_h"] * h if shape.offload_layers else 0.0)
        )
        host = t * shape.offload_layers * c["act_per_layer_h"]["gc"] * h
    else:
        act = t * nl * c["act_per_layer_h"]["nogc"] * h
    act += t * (c["logit_bytes_liger"] if shape.liger else c["logit_bytes"] * nums["vocab"])
    peak = static + act + c["static_extra_gb"] * 2**30
    fpt = (6 if shape.gradient_checkpointing else 4) * nums["params"]
    if shape.tiled_mlp:
        # the MLP forward runs a third time (its own recompute inside the layer's); the MLP is `mlp_share`
        # of the linear work
        fpt += 2 * nums["mlp_share"] * nums["params"]
    tokens = t * shape.micro_per_step
    # causal attention: QK^T and PV, 2 * 2 * L/2 * heads*head_dim per token and layer forward; x(3 or 4)
    attn = (
        tokens
        * nl
        * 2
        * shape.mean_row_len
        * nums["heads"]
        * nums["head_dim"]
        * (4.5 if shape.gradient_checkpointing else 3.5)
    )
    gpu_micro = (
        c["gpu_fixed_s"][mode]
        + t * fpt / (c["rate_tflops"] * 1e12)
        + attn / shape.micro_per_step / (c["attn_tflops"] * 1e12)
        + 2 * host / (c["offload_gb_per_s"] * 1e9)
    )  # copied out and back, not overlapped
    step = shape.micro_per_step * max(c["cpu_floor_s"][mode], gpu_micro)
    return {
        "gpu": gpu if gpu in CALIB else f"{DEFAULT_GPU} (constants; {gpu} not calibrated)",
        "predicted_peak_gb": round(peak / 1e9, 2),
        "predicted_step_s": round(step, 3),
        "predicted_tokens_per_s": round(tokens / step, 1),
        "flops_per_token": fpt,
        "static_gb": round(static / 1e9, 2),
        "activations_gb": round(act / 1e9, 2),
        "host_offload_gb": round(host / 1e9, 2),
    }


def optim_state_bytes(optim: str) -> int:
    """Bytes a trainable parameter's optimizer state takes: two fp32 AdamW moments, or two 8-bit ones."""
    return 2 if "8bit" in optim else 8


def fits_gpu(peak_gb: float, gpu_memory_gb: float) -> bool:
    """The one rule for "fits": a predicted peak within GPU_MEMORY_FRACTION of the GPU's memory (both in GB)."""
    return peak_gb <= GPU_MEMORY_FRACTION * gpu_memory_gb


def gpu_facts(device: str) -> tuple[str, float]:
    """(name, total memory in bytes) of this process's GPU; the calibrated reference GPU on CPU."""
    if device == "cuda":
        import torch

        i = torch.cuda.current_device()
        return torch.cuda.get_device_name(i), float(torch.cuda.get_device_properties(i).total_memory)
    return DEFAULT_GPU, REFERENCE_GPU_MEMORY


def host_memory_available() -> float | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None
