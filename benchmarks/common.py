"""What every benchmark here shares: the Llama-3-8B shape, the results file written after every variant (a
killed run keeps what it measured), the package versions, and freeing GPU memory between variants."""

from __future__ import annotations

import gc
import json
import platform
from pathlib import Path

LLAMA3_8B = dict(
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


class Results(dict):
    """A JSON results file: `save()` rewrites it whole, so it always holds every variant measured so far."""

    def __init__(self, **init):
        super().__init__(**init)
        self.out: Path | None = None

    def save(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self, indent=2) + "\n")


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib.metadata import version

    for m in ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel", "triton", "datasets"):
        try:
            out[m] = version(m)
        except Exception as e:  # not installed here: say so in the results rather than fail the run
            out[m] = f"missing ({type(e).__name__})"
    return out


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
