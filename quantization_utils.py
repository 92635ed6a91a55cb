"""Quantization setup and LoRA target discovery.

Reads:  the config's `quant` and `model` sections (and the model's config.json; no weights are loaded
        for --list-modules).
Writes: nothing; prints.

Run:
    python quantization_utils.py --config configs/demo.yaml                 # the BitsAndBytesConfig
    python quantization_utils.py --config configs/demo.yaml --list-modules  # linear layers to target

Pick `lora.target_modules` from the --list-modules output, or use `all-linear`.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

from ftkit.config import Config, QuantCfg, load_config

from ftkit.cli import build_parser, parse_args
from ftkit.cli import UserError, log, run_main
from ftkit.models import resolve_model, torch_dtype, warn_remote_code


def build_bnb_config(q: QuantCfg):
    """The BitsAndBytesConfig for a quant section, or None for a full-precision base."""
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (fail here, with a fix, rather than deep inside from_pretrained)
    except ImportError:
        raise UserError("quant.load_in_4bit/8bit needs bitsandbytes, which is not installed; "
                        "run `make install`, or set quant.load_in_4bit=false") from None
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
        raise UserError(f"lora.target_modules has unknown module(s) {unknown}; valid linear layers of this model: "
                        f"{valid} (or 'all-linear'); see python quantization_utils.py --list-modules")
    return list(targets)


def empty_model(cfg: Config):
    """The model's structure without its weights: enough to list modules of an 8B model in a second."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    src, offline = resolve_model(cfg.model)
    warn_remote_code(cfg, src)
    mconf = AutoConfig.from_pretrained(src, local_files_only=offline, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(mconf, trust_remote_code=cfg.model.trust_remote_code)


def main(cfg: Config, list_modules: bool = False) -> None:
    bnb = build_bnb_config(cfg.quant)
    print("BitsAndBytesConfig:" if bnb else "no quantization (full-precision base)")
    if bnb:
        for k, v in bnb.to_dict().items():
            if k.startswith(("load_in", "bnb_4bit", "llm_int8_threshold")):
                print(f"  {k}: {v}")
    if list_modules:
        model = empty_model(cfg)
        head = output_head_name(model)
        print(f"\nlinear layers of {cfg.model.name_or_path} (name: count):")
        for name, n in linear_module_names(model).items():
            note = "  (output head; 'all-linear' skips it)" if name == head else ""
            print(f"  {name}: {n}{note}")
        print(f"\nlora.target_modules now: {cfg.lora.target_modules}")


def cli(argv) -> None:
    p = build_parser(__doc__, config_required=True)
    p.add_argument("--list-modules", action="store_true", help="print the model's linear layer names with counts")
    a = parse_args(p, argv)
    main(load_config(a.config, a.overrides), list_modules=a.list_modules)


if __name__ == "__main__":
    run_main(cli)
