"""Padding-free attention without cross-row contamination ("sdpa_varlen").

Padding-free batches concatenate a micro-batch's rows into one row whose position_ids restart at 0 for
every original row (TRL's DataCollatorForLanguageModeling(padding_free=True), or its bfd packing). Plain
SDPA in transformers 5 sees restarting position_ids, builds a dense (L x L) block-diagonal boolean mask and
hands it to SDPA, which then runs the memory-efficient kernel over the whole packed row: correct, but the
attention costs O(L^2) for the packed length L (16k tokens: 64x the work of 64 rows of 256 tokens) and the
mask alone is L^2 bytes. The "sdpa_varlen" attention registered here (through transformers' public
AttentionInterface, not a patch) takes the row boundaries (cu_seq_lens, from the collator or derived from
position_ids) and runs torch's variable-length flash attention (torch.nn.attention.varlen) on the GPU: each
row attends only to itself, at the cost of its own length. On CPU (and wherever that kernel is missing) it
runs SDPA row by row. Batches that are not packed (generation, padded batches) take the ordinary SDPA path.
"""

from __future__ import annotations

import inspect

from .cli import log

# The name this module registers with transformers; the plan picks it for padding-free rows on the SDPA path.
VARLEN_ATTN = "sdpa_varlen"

_registered = False
_varlen_fn = None  # torch.nn.attention.varlen.varlen_attn, when this torch has it
_varlen_params: set[str] = set()
_varlen_broken = False


def sdpa_supported(mconf) -> bool:
    """Whether transformers has an SDPA path for this model config's causal-LM class. Gemma 2 has none from
    transformers 5.24 on (SDPA cannot soft-cap attention logits, which Gemma 2 does; earlier versions ran it through
    SDPA without the cap), and loading it with attn_implementation="sdpa" raises. A class transformers does not
    map (remote code) is left to decide when it loads."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(mconf)]
    except (KeyError, ValueError):
        return True
    return bool(getattr(cls, "_supports_sdpa", True))


def for_model(requested: str, mconf) -> str:
    """The attention a model loads with: model.attn_implementation, except that "sdpa" (the default) becomes
    "eager" for an architecture without an SDPA path, as transformers itself falls back when nothing is asked."""
    return "eager" if requested == "sdpa" and not sdpa_supported(mconf) else requested


def _load_varlen():
    global _varlen_fn, _varlen_params
    if _varlen_fn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn

            _varlen_fn = varlen_attn
            _varlen_params = set(inspect.signature(varlen_attn).parameters)
        except Exception:  # older torch: no varlen module
            _varlen_fn = False
    return _varlen_fn


def _segments(kwargs: dict, length: int):
    """(cu_seq_lens int32 tensor, max row length) of a packed row, or None when the row is not packed."""
    import torch

    cu, mx = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None:
        return cu.to(torch.int32), int(mx) if mx is not None else None
    pos = kwargs.get("position_ids")
    if pos is None or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != length:
        return None
    starts = (pos[0] == 0).nonzero().flatten()
    if starts.numel() <= 1:
        return None  # one row: plain causal attention is already right
    cu = torch.cat([starts, torch.tensor([length], device=starts.device)]).to(torch.int32)
    return cu, None


def _rowwise_sdpa(q, k, v, cu, scaling):
    """(1, H, L, D) tensors; causal SDPA on each row [cu[i], cu[i+1]) separately."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=2)


def _flash_varlen(q, k, v, cu, max_len, scaling):
    """(1, H, L, D) tensors -> (L, H, D) through torch's varlen flash attention (causal, GQA)."""
    fn = _load_varlen()
    qt, kt, vt = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    kw = {"scale": scaling}
    if "enable_gqa" in _varlen_params:
        kw["enable_gqa"] = qt.shape[1] != kt.shape[1]
    elif qt.shape[1] != kt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
    if "is_causal" in _varlen_params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # torch >= 2.12 spells causal as a window
    return fn(qt, kt, vt, cu, cu, max_len, max_len, **kw)


def varlen_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """An attention function for transformers' AttentionInterface (same signature as sdpa's)."""
    global _varlen_broken
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, _, length, _ = query.shape
    seg = None
    if attention_mask is None and b == 1 and length > 1 and getattr(module, "is_causal", True):
        seg = _segments(kwargs, length)
    if seg is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    cu, max_len = seg
    cu = cu.to(query.device)
    if query.is_cuda and not _varlen_broken and _load_varlen():
        try:
            return _flash_varlen(query, key, value, cu, max_len, scaling).unsqueeze(0), None
        except (RuntimeError, TypeError, ValueError) as e:  # a torch build without the kernel for this dtype/arch
            log.warning("varlen flash attention failed (%s); using row-by-row SDPA", str(e).splitlines()[0])
            _varlen_broken = True
    out = _rowwise_sdpa(query, key, value, cu, scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, **kwargs):
    """The mask for "sdpa_varlen": none for unpadded batches (packed rows are separated by the attention
    itself, so no L x L mask is built), else SDPA's own mask."""
    from transformers.masking_utils import sdpa_mask

    am = kwargs.get("attention_mask")
    if am is None or (am.dim() == 2 and bool(am.all())):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
        AttentionMaskInterface.register(VARLEN_ATTN, varlen_mask)
        _registered = True
    return VARLEN_ATTN


def use_varlen_attention(model) -> None:
    """Switch a loaded model (or its PEFT wrapper) to the padding-free attention."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(VARLEN_ATTN)
    except Exception:  # older transformers: the config field is what the layers read
        base.config._attn_implementation = VARLEN_ATTN
