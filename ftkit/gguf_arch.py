"""The architectures export_gguf.py writes, keyed by transformers' config.model_type: which llama.cpp architecture
each one is (gguf.MODEL_ARCH), which tensors every block must have (gguf.MODEL_TENSOR members, checked against
gguf.MODEL_TENSORS), and what llama.cpp's own converter (convert_hf_to_gguf.py) does beyond renaming tensors
through gguf.TensorNameMap: the rotary row order, Gemma's norm offset, and the hyperparameter keys llama.cpp reads
for the architecture (gguf.Keys). What llama.cpp computes itself is not written: Gemma's embedding scale
(sqrt(hidden_size)) is applied in its graph, from the architecture alone.

A config llama.cpp would run differently from transformers (a sliding-window layout it does not implement, an
untied head where it always ties) is refused in one line before anything is written."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError

# Every dense decoder block: pre-attention norm, q/k/v/o, pre-MLP norm, the gated MLP.
DENSE = ("ATTN_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN")
QK_NORM = ("ATTN_Q_NORM", "ATTN_K_NORM")
# Gemma 2/3 norm the outputs of attention and MLP again before adding them to the residual stream; their pre-MLP
# norm is gguf's FFN_PRE_NORM (the same file name, blk.N.ffn_norm, as the dense FFN_NORM).
GEMMA_BLOCK = tuple("FFN_PRE_NORM" if b == "FFN_NORM" else b for b in DENSE) + ("ATTN_POST_NORM", "FFN_POST_NORM")


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # gguf.MODEL_ARCH member
    blocks: tuple[str, ...]  # gguf.MODEL_TENSOR members every block has
    # llama.cpp's LLAMA rope type rotates adjacent pairs; HF rotates halves (rotate_half), so q/k rows are
    # reordered (ftkit.gguf.interleave_rope_rows). Architectures of llama.cpp's NEOX type rotate halves as HF does.
    rope_rows: bool = False
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored weight, so w + 1 is stored.
    norm_shift: float = 0.0
    always_tied: bool = False  # llama.cpp's architecture has no output tensor: the head is the embedding
    keys: Callable[[Any, Any], None] | None = None  # (GGUFWriter, config): the architecture's own keys
    check: Callable[[Any], str | None] | None = None  # config -> why llama.cpp would compute otherwise, or None

    @property
    def name(self) -> str:
        """general.architecture: llama.cpp's name for it."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[self.gguf_arch]]

    def block_tensors(self, n_layers: int) -> list[str]:
        """The GGUF names (no .weight) every block must have, in gguf's table order."""
        import gguf

        kinds = [gguf.MODEL_TENSOR[b] for b in self.blocks]
        return [gguf.TENSOR_NAMES[k].format(bid=i) for i in range(n_layers) for k in kinds]

    def tensor_names(self, n_layers: int):
        return _tensor_name_map(self.gguf_arch, n_layers)


# Built once per architecture and depth: the gguf package builds the whole map per call (~13 ms for 30 blocks) and
# the writers look up every tensor, which cost ~3.6 s per SmolLM2 export.
@functools.lru_cache(maxsize=None)
def _tensor_name_map(gguf_arch: str, n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch], n_layers)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_types_check(config, pattern: int) -> str | None:
    """llama.cpp fixes Gemma's sliding-window layout by architecture: every `pattern`-th layer global, the rest
    sliding; a config with another layout would attend differently there."""
    want = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(config.num_hidden_layers)
    ]
    have = list(getattr(config, "layer_types", None) or want)
    if have != want:
        return f"its layer_types {have} are not llama.cpp's layout for it (every {pattern}th layer global)"
    return None


def _gemma_scale_check(config, layers_27b: int) -> str | None:
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (known by its layer count), which uses
    # hidden_size / heads: the two values Gemma's query_pre_attn_scalar takes in the released models.
    want = (
        config.hidden_size // config.num_attention_heads if config.num_hidden_layers == layers_27b else head_dim(config)
    )
    if config.query_pre_attn_scalar != want:
        return f"its query_pre_attn_scalar {config.query_pre_attn_scalar} is not the {want} llama.cpp uses"
    return None


def _gemma2_check(config) -> str | None:
    if config.final_logit_softcapping is None or config.attn_logit_softcapping is None:
        return "it has no logit soft-capping, which llama.cpp's gemma2 always applies"
    return _layer_types_check(config, 2) or _gemma_scale_check(config, 46)


def _gemma3_check(config) -> str | None:
    if config.attn_logit_softcapping is not None:
        return "it soft-caps attention logits, which llama.cpp's gemma3 does not"
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default" or float(local.get("rope_theta", 10000.0)) != 10000.0:
        return f"its sliding layers' RoPE ({local}) is not the plain base 10000 llama.cpp uses for them"
    return _layer_types_check(config, 6) or _gemma_scale_check(config, 62)


def _qwen2_check(config) -> str | None:
    if getattr(config, "use_sliding_window", False):
        return "it uses sliding-window attention, which llama.cpp's qwen2 does not implement"
    return None


def _gemma2_keys(w, config) -> None:
    w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(config.sliding_window)


def _gemma3_keys(w, config) -> None:
    if config.final_logit_softcapping:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_sliding_window(config.sliding_window)


def _phi3_keys(w, config) -> None:
    # llama.cpp reads Phi-3's window and then disables it (with a warning); written as its converter does
    if getattr(config, "sliding_window", None):
        w.add_sliding_window(config.sliding_window)


ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", DENSE, rope_rows=True),
    # llama.cpp runs Mistral as Llama (its converter registers MistralForCausalLM with the Llama model)
    "mistral": Arch("LLAMA", DENSE, rope_rows=True),
    "qwen2": Arch("QWEN2", DENSE, check=_qwen2_check),
    "qwen3": Arch("QWEN3", DENSE + QK_NORM),
    # Phi-3 keeps q/k/v in one matrix and gate/up in one (gate rows first), as llama.cpp's phi3 reads them
    "phi3": Arch("PHI3", ("ATTN_NORM", "ATTN_QKV", "ATTN_OUT", "FFN_NORM", "FFN_UP", "FFN_DOWN"), keys=_phi3_keys),
    "gemma2": Arch("GEMMA2", GEMMA_BLOCK, norm_shift=1.0, always_tied=True, keys=_gemma2_keys, check=_gemma2_check),
    "gemma3_text": Arch("GEMMA3", GEMMA_BLOCK + QK_NORM, norm_shift=1.0, keys=_gemma3_keys, check=_gemma3_check),
}


def arch_of(config, what: str) -> Arch:
    """The Arch for a transformers config, or a one-line UserError naming the architectures that work."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise UserError(
            f"{what} is a '{config.model_type}' model; export_gguf.py writes {', '.join(ARCHS)} "
            "(transformers' model_type); convert other architectures with llama.cpp's convert_hf_to_gguf.py"
        )
    if arch.always_tied and not getattr(config, "tie_word_embeddings", False):
        why = f"it has its own output head, which llama.cpp's {arch.name} does not (it reuses the embedding)"
    else:
        why = arch.check(config) if arch.check else None
    if why:
        raise UserError(f"{what} is a '{config.model_type}' model llama.cpp would run differently: {why}")
    return arch
