"""Writing a checkpoint of an architecture llama.cpp runs (ftkit/gguf_arch.py: Llama, Mistral, Qwen2/3, Phi-3,
Gemma 2/3), or its LoRA adapter, as GGUF: tensors mapped and quantized through the `gguf` package (no build step),
K-quants through llama.cpp's own quantizer (ftkit.llamacpp), the tokenizer and chat template as llama.cpp expects
them, names and `general.*` metadata by llama.cpp's conventions, and an Ollama Modelfile."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .cli import log
from .config import InferenceCfg
from .errors import UserError, user_errors
from .gguf_arch import Arch, arch_of, head_dim
from .jsonl import loads
from .prompts import PromptTemplate
from .templates import TEMPLATES, ChatTemplate, go_literal


@dataclass(frozen=True)
class GGUFType:
    matrix: str  # GGML type of 2-D weights written here; "" when llama.cpp's quantizer picks per tensor
    file_type: str  # gguf.LlamaFileType member (general.file_type; llama.cpp's ftype)
    by_llama_cpp: bool = False  # needs llama-cpp-python (the gguf package cannot write K-quants)


# --type / --outtype, named as llama.cpp's llama-quantize names them (lower case here, upper in file names).
# Vectors (norms) are always float32, as in llama.cpp.
TYPES = {
    "f32": GGUFType("F32", "ALL_F32"),
    "f16": GGUFType("F16", "MOSTLY_F16"),
    "bf16": GGUFType("BF16", "MOSTLY_BF16"),
    "q8_0": GGUFType("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": GGUFType("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": GGUFType("Q5_0", "MOSTLY_Q5_0"),
    "q4_0": GGUFType("Q4_0", "MOSTLY_Q4_0"),
    "q6_k": GGUFType("", "MOSTLY_Q6_K", True),
    "q5_k_m": GGUFType("", "MOSTLY_Q5_K_M", True),
    "q5_k_s": GGUFType("", "MOSTLY_Q5_K_S", True),
    "q4_k_m": GGUFType("", "MOSTLY_Q4_K_M", True),
    "q4_k_s": GGUFType("", "MOSTLY_Q4_K_S", True),
    "q3_k_m": GGUFType("", "MOSTLY_Q3_K_M", True),
}
# A LoRA adapter's A/B matrices: llama.cpp adds them in these formats (convert_lora_to_gguf.py's --outtype).
ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# Below 8 bits llama.cpp keeps the output head (the tied embedding when there is no head) at 6 bits or more,
# because every token's logits go through it; the gguf package has no 6-bit writer, so 8 bits it is.
SMALL_TYPES = ("q5_1", "q5_0", "q4_0")


def parse_type(text: str, allowed=None) -> str:
    """--type / --outtype: case-insensitive (llama.cpp writes Q4_K_M, convert_hf_to_gguf.py f16)."""
    allowed = list(allowed or TYPES)
    t = text.strip().lower()
    if t not in allowed:
        raise UserError(f"--type {text} is not supported; choose one of {', '.join(allowed)}")
    return t


def source_type(config) -> str:
    """The lossless type to hand llama.cpp's quantizer: the checkpoint's own float type."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float16")
    return {"bfloat16": "bf16", "float32": "f32"}.get(dtype.replace("torch.", ""), "f16")


@dataclass
class Checkpoint:
    path: Path
    config: Any  # a transformers config of an architecture in ftkit.gguf_arch.ARCHS
    files: dict[str, Path]  # HF tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def read_checkpoint(path: Path) -> Checkpoint:
    """Open a HF checkpoint folder without loading weights; every problem is a UserError before any writing."""
    from transformers import AutoConfig

    if not path.is_dir():
        raise UserError(f"model folder '{path}' does not exist; run merge_adapter.py first or pass --model DIR")
    if not (path / "config.json").is_file():
        raise UserError(
            f"'{path}' has no config.json, so it is not a HF checkpoint; run merge_adapter.py "
            "again (an interrupted merge leaves no merged/ folder) or pass --model DIR"
        )
    with user_errors(f"cannot read '{path / 'config.json'}'", "re-run merge_adapter.py"):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    arch_of(config, f"'{path}'")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"'{index}' is not a valid shard index; re-run merge_adapter.py") from None
        files = {name: path / f for name, f in weight_map.items()}
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            what = "only pickle (.bin) weights, which are not loaded" if any(path.glob("*.bin")) else "no weights"
            raise UserError(
                f"'{path}' holds {what}; export needs a safetensors checkpoint (merge_adapter.py writes one)"
            )
        files = {name: shard for shard in shards for name in safetensors_header(shard)}
    ckpt = Checkpoint(path, config, files)
    for shard in sorted(set(files.values())):
        header = safetensors_header(shard)
        for name, info in header.items():
            if files.get(name) == shard:
                ckpt.shapes[name] = tuple(info["shape"])
    missing = [n for n in files if n not in ckpt.shapes]
    if missing:
        raise UserError(
            f"tensor '{missing[0]}' is listed in the shard index but not in its file; re-run merge_adapter.py"
        )
    return ckpt


def safetensors_header(shard: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file, checked against the file size (a truncated copy fails here)."""
    if not shard.is_file():
        raise UserError(f"weights file '{shard}' is missing; re-run merge_adapter.py")
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, but its header lists {8 + n + end}: truncated")
        for v in header.values():
            if not isinstance(v.get("shape"), list):
                raise ValueError("bad tensor entry")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"weights file '{shard}' is corrupt ({str(e)[:120]}); re-run merge_adapter.py") from None
    return header


def interleave_rope_rows(w, n_heads: int):
    """Reorder q_proj/k_proj output rows from HF's rotary layout to llama.cpp's.

    HF rotates each head's vector as two halves: element i pairs with element i + d/2 (`rotate_half`).
    llama.cpp's Llama RoPE rotates adjacent pairs (2i, 2i + 1). Moving row i of each head to 2i and row
    i + d/2 to 2i + 1 makes the two compute the same attention scores. Per head: view the d rows as
    (2, d/2) = (half, i), swap to (i, half), flatten. transformers' GGUF loader applies the inverse.
    Works for weights (rows x in) and biases (rows).
    """
    rows = w.shape[0]
    d = rows // n_heads
    if rows % n_heads or d % 2:
        raise UserError(
            f"cannot split {rows} attention rows into {n_heads} heads of even size; the config "
            "does not match the weights"
        )
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> list[float]:
    """llama.cpp's rope_freqs for Llama-3.1 "llama3" RoPE scaling: the divisor of each base frequency.

    HF scales frequency f_i to f_i / factor for long wavelengths, keeps short ones, and blends linearly in
    between; llama.cpp divides the base frequency by rope_freqs[i], so rope_freqs[i] = f_i / f_i'.
    """
    rp = rope_params(config)
    base, dim = rp["rope_theta"], head_dim(config)
    factor = rp["factor"]
    low, high = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings") or config.max_position_embeddings
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            scaled = freq
        elif wavelen > low_wavelen:
            scaled = freq / factor
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / scaled)
    return out


def rope_params(config) -> dict:
    """The RoPE of the global (full-attention) layers: llama.cpp's rope.* keys describe those; a model with
    sliding layers (Gemma 3) keeps its local RoPE in a second entry, which ftkit.gguf_arch checks."""
    rp = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rp = dict(rp.get("full_attention") or rp)
    rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    return rp


def rotary_dims(config) -> int:
    """Dimensions of each head that RoPE rotates (Phi-3-style partial_rotary_factor: the first part of each head)."""
    factor = rope_params(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    return int(head_dim(config) * (factor or 1.0))


@dataclass
class TensorPlan:
    hf_name: str | None  # None: computed here (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: str  # GGML type name
    permute_heads: int = 0  # >0: apply interleave_rope_rows with this many heads
    values: list[float] | None = None
    scale: float = 1.0  # multiplied in before conversion (a LoRA B matrix's per-module scaling)
    shift: float = 0.0  # added before conversion (Arch.norm_shift: Gemma's norms stored as w + 1)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.qtype]]
        return self.n_elements // block * size


def storage_type(shape: tuple[int, ...], matrix_type: str) -> str:
    import gguf

    if len(shape) == 1:
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[matrix_type]][0]
    # Quantized blocks need rows that are a multiple of the block size; llama.cpp falls back too.
    return "F16" if shape[-1] % block else matrix_type


def rope_heads(cfg, module: str) -> int:
    """Heads whose rows interleave_rope_rows reorders: q_proj and k_proj of a rope_rows architecture only (0: leave
    as is)."""
    if not arch_of(cfg, "the model").rope_rows:
        return 0
    if module.endswith("self_attn.q_proj"):
        return cfg.num_attention_heads
    if module.endswith("self_attn.k_proj"):
        return cfg.num_key_value_heads or cfg.num_attention_heads
    return 0


def gguf_module_name(cfg, module: str) -> str | None:
    """HF module path ('model.layers.0.self_attn.q_proj') -> GGUF name ('blk.0.attn_q') by the gguf package's
    table for the architecture, None if it has no place there."""
    return arch_of(cfg, "the model").tensor_names(cfg.num_hidden_layers).get_name(module)


def required_tensors(arch: Arch, cfg, tied: bool) -> list[str]:
    """What llama.cpp needs of the architecture: the embedding, the final norm, every block's tensors, the head."""
    need = ["token_embd.weight", "output_norm.weight"] + [
        f"{n}.weight" for n in arch.block_tensors(cfg.num_hidden_layers)
    ]
    return need if tied else need + ["output.weight"]


def plan_tensors(ckpt: Checkpoint, qtype: str) -> list[TensorPlan]:
    """Map every HF tensor to its GGUF name and storage type; unknown tensors are an error, not dropped."""
    cfg = ckpt.config
    arch = arch_of(cfg, f"'{ckpt.path}'")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head = "token_embd.weight" if tied else "output.weight"
    plans = []
    for hf_name, shape in sorted(ckpt.shapes.items(), key=lambda kv: _order(kv[0])):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        base, dot, suffix = hf_name.rpartition(".")
        gname = gguf_module_name(cfg, base) if suffix in ("weight", "bias") else None
        if gname is None:
            raise UserError(
                f"tensor '{hf_name}' has no place in a {arch.name} GGUF; this checkpoint is not a plain "
                f"{cfg.model_type} (extra modules?), which export_gguf.py does not support"
            )
        gguf_name = f"{gname}.{suffix}"
        matrix = "Q8_0" if qtype in SMALL_TYPES and gguf_name == head else TYPES[qtype].matrix
        shift = arch.norm_shift if len(shape) == 1 and gname.endswith("norm") else 0.0
        qt = storage_type(shape, matrix)
        plans.append(TensorPlan(hf_name, gguf_name, tuple(shape), qt, rope_heads(cfg, base), shift=shift))
    names = {p.gguf_name for p in plans}
    lost = [n for n in required_tensors(arch, cfg, tied) if n not in names]
    if lost:
        raise UserError(
            f"the checkpoint in '{ckpt.path}' lacks tensor '{lost[0]}' ({len(lost)} missing); it is "
            "incomplete: re-run merge_adapter.py"
        )
    if plans[0].gguf_name != "token_embd.weight" or plans[0].shape[0] != cfg.vocab_size:
        raise UserError(
            f"token embedding has {plans[0].shape[0]} rows but config.json says vocab_size "
            f"{cfg.vocab_size}; the checkpoint is inconsistent"
        )
    rp = rope_params(cfg)
    if rp["rope_type"] == "llama3":
        factors = llama3_rope_factors(cfg)
        plans.insert(1, TensorPlan(None, "rope_freqs.weight", (len(factors),), "F32", values=factors))
    return plans


def _order(name: str) -> tuple:
    # llama.cpp's order: embeddings, blocks by number, final norm, output head.
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def iter_tensor_data(
    ckpt: Checkpoint, plans: list[TensorPlan], rounding: Callable[[str, Any], Any] | None = None
) -> Iterator[tuple[TensorPlan, Any]]:
    """One converted numpy array at a time, so memory stays at one tensor plus the open mmap. `rounding(hf_name,
    tensor)` (ftkit.gptq) may move a quantized weight onto its grid first; the gguf package then packs it."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    try:
        for p in plans:
            if p.values is not None:
                yield p, np.asarray(p.values, dtype=np.float32)
                continue
            f = ckpt.files[p.hf_name]
            if f not in handles:
                handles[f] = safe_open(f, framework="pt").__enter__()
            t = handles[f].get_tensor(p.hf_name).float()
            if p.scale != 1.0:
                t = t * p.scale
            if p.shift:
                t = t + p.shift
            if p.permute_heads:
                t = interleave_rope_rows(t, p.permute_heads)
            if p.qtype == "F32":
                arr = t.numpy()
            elif p.qtype == "F16":
                h = t.to(torch.float16)
                if torch.isinf(h).any():
                    raise UserError(
                        f"tensor '{p.hf_name}' has values beyond float16's range (65504); "
                        "export with --type bf16 instead"
                    )
                arr = h.numpy()
            elif p.qtype == "BF16":
                arr = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            else:
                if rounding is not None:
                    t = rounding(p.hf_name, t)
                arr = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[p.qtype])
            yield p, arr
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None
    model: str = "gpt2"  # tokenizer.ggml.model: 'gpt2' byte-level BPE, 'llama' SentencePiece
    scores: list[float] | None = None  # SentencePiece only: llama.cpp merges by them
    add_space_prefix: bool = False  # SentencePiece's dummy prefix; byte-level BPE encodes spaces itself


def _types_in(node: Any) -> list[dict]:
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or []
    return [node] + [n for sub in inner for n in _types_in(sub)]


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp picks its pre-tokenizer regex by name; name the one this tokenizer.json actually uses."""
    parts = [n for n in _types_in(tj.get("pre_tokenizer")) if n.get("type") != "Sequence"]
    kinds = [n.get("type") for n in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    split = parts[0].get("pattern", {}).get("Regex") if kinds == ["Split", "ByteLevel"] else None
    if split in SPLITS:
        return SPLITS[split]
    log.warning("unrecognised pre-tokenizer %s; writing 'default' (llama.cpp may split text differently)", kinds)
    return "default"


LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Qwen2/2.5/3's: Llama 3's, but digits one at a time (\p{N} where Llama 3 has \p{N}{1,3})
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
# tokenizer.json's Split regex -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _vocab_kind(tj: dict) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE with byte fallback: Llama 2, Mistral, Gemma, Phi-3), the
    two layouts llama.cpp tokenizes as transformers does; anything else is refused."""
    model = tj.get("model", {})
    nodes = _types_in(tj.get("pre_tokenizer")) + _types_in(tj.get("decoder"))
    if model.get("type") == "BPE" and any(n.get("type") == "ByteLevel" for n in nodes):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise UserError(
        f"the tokenizer is {model.get('type')} without byte-level encoding or byte fallback; export_gguf.py writes "
        "byte-level BPE (Llama 3, Qwen, SmolLM2) and SentencePiece BPE with byte fallback (Mistral, Gemma, Phi-3) "
        "tokenizers; use llama.cpp's convert_hf_to_gguf.py for others"
    )


def _space_prefix(tj: dict, template: PromptTemplate) -> bool:
    """tokenizer.ggml.add_space_prefix: whether llama.cpp puts SentencePiece's dummy '▁' before text, which it does
    at the start and after every special token. tokenizer.json states the prefix as a Prepend('▁') normalizer (on
    every text between special tokens, as llama.cpp), a Metaspace 'always' (the same), or a Metaspace 'first' (the
    start of the input only: none after BOS or EOS). Gemma's has none. For 'first', no setting matches everywhere:
    a chat template that writes its own BOS (or starts at a turn marker) puts a special token before all text, so
    no prefix matches its prompts exactly; a prompt whose BOS the tokenizer adds (Alpaca's, the registry's alpaca)
    starts with text, which the prefix matches."""
    nodes = _types_in(tj.get("pre_tokenizer")) + _types_in(tj.get("normalizer"))
    schemes = {
        n.get("prepend_scheme", "always" if n.get("add_prefix_space") else "never")
        for n in nodes
        if n.get("type") == "Metaspace"
    }
    normalizers = (tj.get("normalizer") or {}).get("normalizers") or []
    if "always" in schemes or any(n.get("type") == "Prepend" for n in normalizers):
        return True
    return "first" in schemes and template.tokenizer_bos()


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest; transformers
    applies the lowest-ranked merge. A piece's score is minus the rank of the first merge that makes it, so both
    merge in the same order; pieces no merge makes (characters, bytes, control tokens) are never merge results."""
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        first.setdefault(m.replace(" ", "", 1), rank)  # SentencePiece pieces spell spaces '▁': one separator
    return [-float(first[t]) - 1.0 if t in first else 0.0 for t in tokens]


def _token_table(tj: dict, vocab_size: int, kind: str, unk_id: int | None) -> tuple[list[str], list[int]]:
    """Tokens by id and llama.cpp's token types: added special tokens CONTROL, other added ones USER_DEFINED, and for
    SentencePiece the unknown piece UNKNOWN and the <0xNN> pieces BYTE (llama.cpp's byte fallback looks them up)."""
    import gguf

    model = tj["model"]
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = bool(added.get("special"))
    n = max(by_id) + 1
    if n > vocab_size:
        raise UserError(
            f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows; "
            "the tokenizer does not belong to this model"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        tokens.append(f"[PAD{i}]" if t is None else t)
        if t is None:  # embedding rows beyond the tokenizer (padding to a multiple): never produced
            types.append(gguf.TokenType.UNUSED)
        elif kind == "llama" and i == unk_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and BYTE_PIECE.fullmatch(t):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def read_vocab(tok, template: PromptTemplate, vocab_size: int) -> Vocab:
    """The vocabulary in llama.cpp's 'gpt2' (byte-level BPE) or 'llama' (SentencePiece) layout, from the HF fast
    tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the tokenizer has no fast (tokenizer.json) form; export needs its tokenizer.json")
    tj = json.loads(backend.to_str())
    kind = _vocab_kind(tj)
    model = tj["model"]
    # tokenizer.json's BPE model may leave unk_token empty (SentencePiece ones; byte-level ones, which never need
    # it, as transformers >= 5.24 converts SmolLM2's GGUF); the tokenizer still names it, and llama.cpp's own
    # converter (gguf's SpecialVocab, from tokenizer_config.json) writes that id for every vocabulary type
    unk = model.get("unk_token") or tok.unk_token
    unk_id = tok.convert_tokens_to_ids(unk) if unk else None
    tokens, types = _token_table(tj, vocab_size, kind, unk_id)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] and len(probe) > 1
    eos, eot = tok.eos_token_id, None
    if template.kind == "chat":
        end = template.end_of_turn_id(tok)
        if end is not None:
            eos = eot = end  # a chat model ends its turn with this token; llama.cpp must stop there
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges if kind == "gpt2" else [],
        pre=pre_tokenizer_name(tj) if kind == "gpt2" else "default",
        bos_id=tok.bos_token_id,
        eos_id=eos,
        eot_id=eot,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        unk_id=unk_id,
        add_bos=add_bos,
        chat_template=gguf_chat_template(template),
        model=kind,
        scores=_spm_scores(tokens, merges) if kind == "llama" else None,
        add_space_prefix=kind == "llama" and _space_prefix(tj, template),
    )


def gguf_chat_template(template: PromptTemplate) -> str | None:
    """The Jinja template stored in the GGUF (llama.cpp's chat mode and server render prompts with it).

    chat: the tokenizer's template frozen at training time. alpaca: a template that renders the Alpaca
    prompt used in training from the last user message (single turn; a system message is put in front,
    exactly as PromptTemplate.render_prompt does).
    """
    if template.kind == "chat":
        return template.chat_template
    body = template.prompt_no_input.replace("{instruction}", "\x00")
    head, _, tail = body.partition("\x00")
    system = template.system_prompt
    return (
        "{%- set ns = namespace(system="
        + json.dumps(system or "")
        + ", user='') -%}"
        + "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
        "{%- elif m['role'] == 'user' -%}{%- set ns.user = m['content'] -%}{%- endif -%}{%- endfor -%}"
        "{%- if ns.system -%}{{ ns.system + '\\n\\n' }}{%- endif -%}"
        "{{ " + json.dumps(head) + " + ns.user + " + json.dumps(tail) + " }}"
        "{%- if messages[-1]['role'] == 'assistant' -%}{{ messages[-1]['content'] }}{%- endif -%}"
    )


# A chat of three turns whose texts cannot occur in a template: where each lands in a rendering shows its layout.
PROBE_CHAT = [
    {"role": "user", "content": "\x01"},
    {"role": "assistant", "content": "\x02"},
    {"role": "user", "content": "\x03"},
]


def _as(template: PromptTemplate, entry: ChatTemplate) -> PromptTemplate:
    return replace(template, chat_template=entry.jinja, name=entry.name)


def chat_style(tok, template: PromptTemplate) -> str | None:
    """The registered template (ftkit/templates.py) a chat template renders as, whatever its origin (the tokenizer's
    own, a file, a registered name): its end of turn is one of the stop tokens, and its rendering of a probe chat
    appears whole in this template's (which may add BOS or a default system turn around it)."""
    if template.kind != "chat":
        return None
    try:
        rendered = template.render(tok, PROBE_CHAT, True)
    except UserError:  # a template that refuses the probe chat is none of the registered layouts
        return None
    bos = tok.bos_token or ""
    for entry in TEMPLATES.values():
        end = entry.end_of_turn_text(tok.eos_token)
        if end is None or tok.convert_tokens_to_ids(end) not in template.stop_token_ids:
            continue
        text = _as(template, entry).render(tok, PROBE_CHAT, True)
        if (text[len(bos) :] if bos and text.startswith(bos) else text) in rendered:
            return entry.name
    return None


def default_system(tok, template: PromptTemplate, style: str | None) -> str | None:
    """The system prompt training used: the configured one, else the one the chat template adds by itself (what it
    writes, given no system turn, where its registered style writes a system turn's text)."""
    if template.system_prompt:
        return template.system_prompt
    if style is None:
        return None
    user = PROBE_CHAT[:1]
    with_system = _as(template, TEMPLATES[style]).render(tok, [{"role": "system", "content": "\x04"}, *user], True)
    head, _, tail = with_system.partition("\x04")
    text = template.render(tok, user, True)
    if len(text) > len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
        return text[len(head) : len(text) - len(tail)]
    return None


def ollama_template(tok, template: PromptTemplate, add_bos: bool) -> tuple[str, str | None, str]:
    """(Go TEMPLATE, SYSTEM, style). A template that renders as a registered one gets that entry's multi-turn Ollama
    form; anything else a single-turn template cut from the training render itself, with .System and .Prompt in
    place."""
    style = chat_style(tok, template)
    system = default_system(tok, template, style)
    if style is not None:
        return TEMPLATES[style].ollama_form(tok.eos_token), system, style
    bos = tok.bos_token if add_bos else None

    def cut(t: PromptTemplate) -> str:
        text = t.render_prompt(tok, "\x01")
        if bos and text.startswith(bos):
            text = text[len(bos) :]  # llama.cpp adds BOS itself
        return go_literal(text).replace("\x01", "{{ .Prompt }}").replace("\x02", "{{ .System }}")

    no_sys = cut(replace(template, system_prompt=None))
    with_sys = cut(replace(template, system_prompt="\x02"))
    if "{{ .System }}" not in with_sys:
        return no_sys, system, "raw"
    return "{{ if .System }}" + with_sys + "{{ else }}" + no_sys + "{{ end }}", system, "raw"


def modelfile_text(
    gguf_name: str,
    tok,
    template: PromptTemplate,
    icfg: InferenceCfg,
    add_bos: bool,
    source: str,
    adapter: str | None = None,
) -> str:
    go, system, style = ollama_template(tok, template, add_bos)
    stops = [tok.convert_ids_to_tokens(i) for i in template.stop_token_ids] + list(template.stop_strings)
    lines = [
        f"{MODELFILE_HEADER} for {source}",
        f"# Prompt: the {template.kind} template used in training ({style}).",
        "#   ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        *([f"ADAPTER {adapter if adapter.startswith(('.', '/')) else './' + adapter}"] if adapter else []),
        f'TEMPLATE """{go}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    lines += [
        f"PARAMETER temperature {icfg.temperature if icfg.do_sample else 0}",
        f"PARAMETER top_p {icfg.top_p}",
        f"PARAMETER top_k {icfg.top_k}",
        f"PARAMETER repeat_penalty {icfg.repetition_penalty}",
        f"PARAMETER num_predict {icfg.max_new_tokens}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Names:
    """general.* metadata and the file name, as llama.cpp's convert scripts write them
    (<BaseName>-<SizeLabel>-<FineTune>-<Type>.gguf, '-LoRA' before the type for an adapter)."""

    name: str  # general.name
    basename: str | None
    size_label: str | None
    finetune: str | None
    base_model: dict  # name / organization / repo_url of the model this was trained from

    def file_name(self, qtype: str, adapter: bool = False) -> str:
        import gguf

        # naming_convention puts '-LoRA' after the type; llama.cpp's own convert_lora_to_gguf.py does the same
        return (
            gguf.utility.naming_convention(
                None, self.basename, self.finetune, None, self.size_label, qtype.upper(), "LoRA" if adapter else None
            )
            + ".gguf"
        )


def _slug(text: str) -> str:
    # A file-name component: llama.cpp's names separate fields with '-', so none inside a field.
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_.") or "model"


def export_names(config, n_params: int, base_id: str, finetune: str | None) -> Names:
    """Names from model facts: the size label from the parameter count, the base name and organization from the
    base model's id (a hub id 'org/Name-8B-Instruct', or a local folder's name)."""
    import gguf
    from gguf.metadata import Metadata

    local = Path(base_id).expanduser().exists() or base_id.startswith((".", "/", "~"))
    model_id = Path(base_id).name if local else base_id
    full, org, basename, base_finetune, version, _ = Metadata.get_model_id_components(model_id, n_params)
    size = gguf.utility.size_label(n_params, 0, 0, 0)
    base = {"name": full or model_id}
    if org and not local:
        base |= {"organization": org, "repo_url": f"https://huggingface.co/{base_id}"}
    tune = "-".join(_slug(t) for t in (base_finetune, finetune) if t) or None
    return Names(
        name=" ".join(x for x in (basename or _slug(model_id), size, tune) if x),
        basename=_slug(basename or model_id),
        size_label=size,
        finetune=tune,
        base_model=base,
    )


# Written into every GGUF export_gguf.py makes (llama.cpp's quantizer copies it): a file at --outfile is replaced
# only when it carries this key, since any other GGUF there (a downloaded model) is the user's.
WRITER_KEY = "ftkit.writer"
WRITER = "export_gguf.py"


def written_by_us(path: Path) -> bool:
    """The GGUF at `path` was written by export_gguf.py (carries WRITER_KEY); False for anything unreadable."""
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        reader = gguf.GGUFReader(path)
        return WRITER_KEY in reader.fields and str(reader.fields[WRITER_KEY].contents()) == WRITER
    except (ValueError, KeyError, IndexError, OSError, TypeError):
        return False


def _add_general(w, names: Names, kind: str) -> None:
    w.add_string(WRITER_KEY, WRITER)
    w.add_type(kind)
    w.add_name(names.name)
    if names.basename:
        w.add_basename(names.basename)
    if names.finetune:
        w.add_finetune(names.finetune)
    if names.size_label:
        w.add_size_label(names.size_label)
    w.add_base_model_count(1)
    w.add_base_model_name(0, names.base_model["name"])
    if "organization" in names.base_model:
        w.add_base_model_organization(0, names.base_model["organization"])
        w.add_base_model_repo_url(0, names.base_model["repo_url"])


def _write_file(
    tmp: Path,
    out: Path,
    arch: str,
    metadata: Callable[[Any], None],
    plans: list[TensorPlan],
    data: Iterator,
    desc: str,
) -> None:
    """Header, metadata (added by `metadata(writer)`), tensor table, then tensor data one at a time; fsync'd,
    size-checked, renamed. Any failure (Ctrl+C included) removes the temporary file, so `out` is either the old
    file or the whole new one."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    w = gguf.GGUFWriter(tmp, arch)
    try:
        metadata(w)
        for p in plans:
            w.add_tensor_info(
                p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=gguf.GGMLQuantizationType[p.qtype]
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, arr in tqdm(data, total=len(plans), desc=desc, unit="tensor"):
            w.write_tensor_data(arr)
        w.flush()
        for f in w.fout or []:
            os.fsync(f.fileno())
        w.close()
        check_written(tmp, plans)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def tmp_path_for(out: Path, tag: str = "tmp") -> Path:
    # clean_tmp_leftovers (ftkit.runlock) recognises and removes '.<name>.<tag>-<pid>' after a kill
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def _add_vocab(w, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":  # a SentencePiece vocabulary has no pre-tokenizer regex and merges by score instead
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_token_merges(vocab.merges)


def write_gguf(
    ckpt: Checkpoint,
    plans: list[TensorPlan],
    vocab: Vocab,
    qtype: str,
    names: Names,
    out: Path,
    tmp: Path | None = None,
    rounding: Callable[[str, Any], Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """The model GGUF at `out` (through `tmp`, default a hidden sibling; tmp == out writes in place, for a file
    that is itself temporary). `rounding`: see iter_tensor_data; `extra`: more string/int metadata keys."""
    import gguf

    cfg = ckpt.config
    arch = arch_of(cfg, f"'{ckpt.path}'")

    def metadata(w) -> None:
        _add_general(w, names, "model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rp = rope_params(cfg)
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_rope_dimension_count(rotary_dims(cfg))
        if head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(head_dim(cfg))
            w.add_value_length(head_dim(cfg))
        if rp["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rp["factor"])
        if arch.keys:
            arch.keys(w, cfg)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType[TYPES[qtype].file_type])
        if TYPES[qtype].matrix.startswith("Q"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, vocab)
        for key, val in (
            ("bos", vocab.bos_id),
            ("eos", vocab.eos_id),
            ("eot", vocab.eot_id),
            ("unk", vocab.unk_id),
            ("pad", vocab.pad_id),
        ):
            if val is not None:
                getattr(w, f"add_{key}_token_id")(int(val))
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(vocab.add_space_prefix)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for key, val in (extra or {}).items():
            (w.add_uint32 if isinstance(val, int) else w.add_string)(key, val)

    tmp = tmp or tmp_path_for(out)
    data = iter_tensor_data(ckpt, plans, rounding)
    _write_file(tmp, out, arch.name, metadata, plans, data, f"writing {qtype}")


# -- the LoRA adapter as a llama.cpp adapter GGUF (llama.cpp's --lora, Ollama's ADAPTER) ---------------------------
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def _peft_key_match(key: str, module: str) -> bool:
    # PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching the module path's tail
    return re.match(rf"(.*\.)?({key})$", module) is not None


@dataclass
class AdapterPlan:
    ckpt: Checkpoint  # files/shapes of adapter_model.safetensors; config = the base model's config
    plans: list[TensorPlan]
    alpha: float
    rank: int


def plan_adapter(adapter_dir: Path, adapter_cfg: dict, base_config, qtype: str) -> AdapterPlan:
    """Map PEFT's lora_A/lora_B to llama.cpp's '<tensor>.lora_a' / '.lora_b'.

    llama.cpp computes scale = adapter.lora.alpha / rank per tensor pair (rank = lora_b's inner size), which is
    PEFT's plain LoRA scaling. Where PEFT scales otherwise (use_rslora: alpha/sqrt(r); rank_pattern and
    alpha_pattern), the ratio is folded into lora_B, so the sum W + scale * B @ A is PEFT's exactly. q/k rows are
    reordered for llama.cpp's RoPE like the base weights; only B's rows (the output side) move.
    """
    peft_type = adapter_cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"the adapter is {peft_type}; llama.cpp loads LoRA adapters only: export the merged model")
    if adapter_cfg.get("use_dora"):
        raise UserError(
            "the adapter uses DoRA (lora.use_dora), which llama.cpp cannot apply; export the merged model instead "
            "(python merge_adapter.py && python export_gguf.py)"
        )
    if adapter_cfg.get("modules_to_save"):
        raise UserError(
            f"the adapter also trains whole modules ({', '.join(adapter_cfg['modules_to_save'])}: "
            "lora.modules_to_save), which a llama.cpp adapter cannot carry; export the merged model instead"
        )
    if adapter_cfg.get("bias", "none") != "none":
        raise UserError(
            f"the adapter trains biases (lora.bias={adapter_cfg['bias']}), which a llama.cpp adapter cannot carry; "
            "export the merged model instead"
        )
    f = adapter_dir / "adapter_model.safetensors"
    header = safetensors_header(f)
    alpha = float(adapter_cfg.get("lora_alpha") or 8)
    r_default = int(adapter_cfg.get("r") or 8)
    rank_pattern, alpha_pattern = adapter_cfg.get("rank_pattern") or {}, adapter_cfg.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, str]] = {}
    for key in header:
        m = LORA_KEY.match(key)
        if not m:
            raise UserError(
                f"adapter tensor '{key}' is not a LoRA A/B matrix (trained embeddings or extra modules?); "
                "a llama.cpp adapter cannot carry it: export the merged model instead"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = key
    if not pairs:
        raise UserError(f"'{f}' holds no LoRA matrices; train again")
    ckpt = Checkpoint(
        adapter_dir, base_config, {k: f for k in header}, {k: tuple(v["shape"]) for k, v in header.items()}
    )
    plans = []
    for module, ab in sorted(pairs.items(), key=lambda kv: _order(kv[0])):
        gname = gguf_module_name(base_config, module)
        if gname is None or not gname.startswith("blk.") or len(ab) != 2:
            what = "has only one of lora_A/lora_B" if len(ab) != 2 else "is not a projection inside a decoder block"
            raise UserError(
                f"adapter module '{module}' {what}; a llama.cpp adapter cannot carry it: export the merged model"
            )
        a_shape, b_shape = ckpt.shapes[ab["A"]], ckpt.shapes[ab["B"]]
        r = a_shape[0]
        key_r = next((int(v) for k, v in rank_pattern.items() if _peft_key_match(k, module)), r_default)
        key_a = next((float(v) for k, v in alpha_pattern.items() if _peft_key_match(k, module)), alpha)
        if r != key_r or b_shape[1] != r:
            raise UserError(
                f"adapter module '{module}' has rank {r} but adapter_config.json says {key_r}; the adapter folder "
                "is inconsistent: train again"
            )
        peft_scale = key_a / (math.sqrt(r) if adapter_cfg.get("use_rslora") else r)
        fold = peft_scale / (alpha / r)
        plans.append(TensorPlan(ab["A"], f"{gname}.weight.lora_a", a_shape, storage_type(a_shape, TYPES[qtype].matrix)))
        plans.append(
            TensorPlan(
                ab["B"],
                f"{gname}.weight.lora_b",
                b_shape,
                storage_type(b_shape, TYPES[qtype].matrix),
                rope_heads(base_config, module),
                scale=fold,
            )
        )
    return AdapterPlan(ckpt, plans, alpha, r_default)


def write_adapter_gguf(ap: AdapterPlan, qtype: str, names: Names, out: Path) -> None:
    import gguf

    def metadata(w) -> None:
        _add_general(w, names, "adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ap.alpha)
        w.add_file_type(gguf.LlamaFileType[TYPES[qtype].file_type])

    tmp = tmp_path_for(out)
    arch = arch_of(ap.ckpt.config, "the adapter's base").name
    _write_file(tmp, out, arch, metadata, ap.plans, iter_tensor_data(ap.ckpt, ap.plans), f"writing LoRA {qtype}")


def read_gguf(path: Path):
    """A GGUFReader over `path`; a file the gguf reader cannot parse is a UserError. Parsing is the cost (every
    tokenizer entry is a field: seconds for a 49k vocabulary), so callers read a file once."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise UserError(f"'{path}' is not a readable GGUF file ({str(e)[:100]}); export it again") from None


def _type_of(reader) -> tuple[str, str]:
    field = lambda k, d: reader.fields[k].contents() if k in reader.fields else d  # noqa: E731
    return str(field("general.type", "model")), str(field("general.architecture", ""))


def gguf_type(path: Path) -> tuple[str, str]:
    """(general.type, general.architecture) of a GGUF file: 'model' or 'adapter', e.g. 'llama'. A file the gguf
    reader cannot parse is a UserError."""
    return _type_of(read_gguf(path))


def check_adapter_fits(base: Path, lora: Path) -> None:
    """A LoRA adapter GGUF against the model GGUF it is applied to: same architecture, and every lora_a/lora_b
    pair matches a tensor of the model in shape (llama.cpp's own checks; llama-cpp-python does not report their
    failure, and would serve the model without the adapter)."""
    lora_reader, base_reader = read_gguf(lora), read_gguf(base)
    (kind, arch), (_, base_arch) = _type_of(lora_reader), _type_of(base_reader)
    if kind != "adapter":
        raise UserError(f"'{lora}' is a GGUF {kind}, not a LoRA adapter")
    if arch != base_arch:
        raise UserError(f"the adapter '{lora}' is for a '{arch}' model but '{base}' is '{base_arch}'")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in base_reader.tensors}
    for t in lora_reader.tensors:
        name, _, part = t.name.rpartition(".")
        have = shapes.get(name)
        # GGUF shapes are ggml's (ne0 = row length first): lora_a is (in, r), lora_b (r, out), the weight (in, out)
        dim = 0 if part == "lora_a" else 1
        if have is None or int(t.shape[dim]) != have[dim]:
            raise UserError(
                f"the adapter '{lora}' does not fit '{base}': its {t.name} has shape {tuple(int(x) for x in t.shape)} "
                f"but the model's {name} is {have}; apply it over the base model it was trained on"
            )


def check_quantized(path: Path, file_type: int, n_tensors: int) -> None:
    """What llama.cpp's quantizer wrote, read back: the file type asked for and every tensor present."""
    import gguf

    reader = gguf.GGUFReader(path)
    got = reader.fields["general.file_type"].contents()
    if got != file_type or len(reader.tensors) != n_tensors:
        raise RuntimeError(
            f"llama.cpp wrote file type {got} with {len(reader.tensors)} tensors; expected {file_type} with {n_tensors}"
        )


def check_written(path: Path, plans: list[TensorPlan]) -> None:
    """A cheap check that every tensor byte reached the disk (the writer checked each tensor's size)."""
    data = sum(-(-p.nbytes // 32) * 32 for p in plans)  # GGUF aligns each tensor to 32 bytes
    if path.stat().st_size < data:
        raise RuntimeError(f"{path} is {path.stat().st_size} bytes, less than its {data} bytes of tensor data")


MODELFILE_HEADER = "# Ollama Modelfile written by export_gguf.py"
