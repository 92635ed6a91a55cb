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

from ftkit.cli import build_parser, parse_args, run_main
from ftkit.config import Config, load_config
from ftkit.models import model_skeleton, resolve_model
from ftkit.quant import build_bnb_config, linear_module_names, output_head_name


def main(cfg: Config, list_modules: bool = False) -> None:
    bnb = build_bnb_config(cfg.quant)
    print("BitsAndBytesConfig:" if bnb else "no quantization (full-precision base)")
    if bnb:
        for k, v in bnb.to_dict().items():
            if k.startswith(("load_in", "bnb_4bit", "llm_int8_threshold")):
                print(f"  {k}: {v}")
    if list_modules:
        model = model_skeleton(cfg, *resolve_model(cfg.model))  # structure only, no weights
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
