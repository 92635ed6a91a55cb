"""The 4-bit bitsandbytes setup (BitsAndBytesConfig from the quant section) and a model's linear layers, from
which LoRA's target_modules are picked and checked."""

from __future__ import annotations

from collections import Counter, OrderedDict

from .config import QuantCfg
from .errors import UserError
from .models import torch_dtype


def build_bnb_config(q: QuantCfg):
    """The BitsAndBytesConfig for a quant section, or None for a full-precision base."""
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (fail here, with a fix, rather than deep inside from_pretrained)
    except ImportError:
        raise UserError(
            "quant.load_in_4bit/8bit needs bitsandbytes, which is not installed; "
            "run `make install`, or set quant.load_in_4bit=false"
        ) from None
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.bnb_4bit_quant_storage) if q.bnb_4bit_quant_storage != "uint8" else None,
    )


def linear_module_names(model) -> "OrderedDict[str, int]":
    """Leaf names of linear layers (what LoRA's target_modules matches) with how many of each, in model order.

    Matched by class name so that bitsandbytes' Linear4bit/Linear8bitLt count as linear layers too.
    """
    counts: Counter = Counter()
    order: list[str] = []
    for full, mod in model.named_modules():
        if "Linear" in type(mod).__name__ and hasattr(mod, "weight"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in counts:
                order.append(leaf)
            counts[leaf] += 1
    return OrderedDict((k, counts[k]) for k in order)


def output_head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full, mod in model.named_modules():
        if mod is head:
            return full.rsplit(".", 1)[-1]
    return None


def validate_target_modules(model, targets) -> list[str] | str:
    """Return the targets if every name exists in the model; else a UserError listing the valid names."""
    if targets == "all-linear":
        return targets
    names = linear_module_names(model)
    head = output_head_name(model)
    unknown = [t for t in targets if t not in names]
    if unknown:
        valid = ", ".join(n for n in names if n != head)
        raise UserError(
            f"lora.target_modules has unknown module(s) {unknown}; valid linear layers of this model: "
            f"{valid} (or 'all-linear'); see python quantization_utils.py --list-modules"
        )
    return list(targets)


def validate_modules_to_save(model, names: list[str] | None) -> None:
    """Every lora.modules_to_save name must be a module of the model (PEFT matches the last dotted parts, and
    silently trains nothing for a name that matches none)."""
    if not names:
        return
    full = [n for n, _ in model.named_modules()]
    unknown = [m for m in names if not any(n == m or n.endswith("." + m) for n in full)]
    if unknown:
        top = sorted({n.rsplit(".", 1)[-1] for n in full if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise UserError(
            f"lora.modules_to_save has unknown module(s) {unknown}; modules of this model: {', '.join(top)}"
        )
