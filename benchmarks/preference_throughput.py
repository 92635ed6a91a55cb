"""Preference-tuning throughput: plain TRL DPOTrainer against finetune.py's DPO path (train.method=dpo), side by
side in one run, on the same 4-bit base, the same pairs and the same YAML batch (8 pairs x 2 accumulation).

GPU (issue 26's benchmark; benchmarks/README.md has the command that produced the results file):
    python benchmarks/preference_throughput.py --out benchmarks/results/h200_dpo.json \
        --tokenizer .bench/tokenizer --data .bench/alpaca_en_1k.json
  builds Llama-3-8B's architecture with random weights once (--model-dir; train_throughput.py's builder), loads
  it in 4-bit NF4 + double quant through finetune.py's loader, makes Alpaca preference pairs from --data (the
  chosen answer is the row's own output, the rejected one another row's: the content does not change a step's
  cost, only its length does) and trains:
    (a) plain: TRL DPOTrainer around a PEFT config, padded batches of both sides, gradient checkpointing, the
        reference as the adapter-disabled base (TRL's PEFT default), 8 x 2;
    (b) project: configs/llama3_alpaca.yaml with train.method=dpo through ftkit (make_plan, apply_lora, the speed
        switches, trainer_args, build_trainer), the YAML's own 8 x 2 as the plan turns it into micro-batches.
  Tokens are counted as trained: each pair is its prompt twice (once per side) plus both answers.
Smoke run (tests/test_benchmarks.py): the same two variants on the CPU, on a 2-layer model of Llama-3-8B's
architecture built in a temporary folder, pairs from the shipped demo rows, one timed step each:
    python benchmarks/preference_throughput.py --tiny --tokenizer .cache/models/SmolLM2-135M-Instruct --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_side_by_side, versions  # noqa: E402

# variant() records into train_throughput's results file object: this run's own, as --out names it
from benchmarks.train_throughput import (  # noqa: E402
    RESULTS,
    build_model,
    method_trainer,
    plain_args,
    plain_lora,
    run_trainer,
    variant,
)

CONFIG = "configs/llama3_alpaca.yaml"  # its 8 x 2 is the batch the issue names
# --tiny's defaults beside the GPU benchmark's
DEFAULTS = {
    "model_dir": ("/tmp/llama3-8b-random", None),
    "data": (".bench/alpaca_en_1k.json", "data/demo_tasks.jsonl"),
    "pairs": (0, 48),
    "warmup": (2, 1),
    "steps": (10, 1),
}


def make_pairs(src: Path, out: Path, n: int) -> int:
    """Alpaca preference rows (instruction, input, chosen, rejected) from Alpaca rows: the rejected answer is the
    output of the row seven further on. Rows whose two answers are equal are left out (the project drops them)."""
    from ftkit.jsonl import read_jsonl

    if src.suffix == ".json":
        rows = json.loads(src.read_text())
    else:
        rows = [r for _, r in read_jsonl(src, "benchmark data", "")]
    pairs = []
    for i, r in enumerate(rows):
        other = rows[(i + 7) % len(rows)]["output"]
        if other != r["output"]:
            pairs.append({"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["output"]})
            pairs[-1]["rejected"] = other
    pairs = pairs[:n] if n else pairs
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return len(pairs)


def pair_tokens(f: dict) -> int:
    """The tokens one pair costs a step: both sides, each with the prompt."""
    return 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])


def plain_dpo(base, tok, rows, steps: int, warmup: int, device: str, max_length: int, batch=8, accum=2):
    """(a) The plain recipe: TRL's DPOTrainer defaults around a PEFT config, checkpointing on."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # TRL's defaults: DPOConfig, like SFTConfig, checkpoints (gradient_checkpointing=True), as the recipe does
    args = DPOConfig(**plain_args(steps, device, batch, accum, max_length))
    trainer = DPOTrainer(
        model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=plain_lora()
    )
    return run_trainer(trainer, warmup, device, count=pair_tokens)


def project_dpo(base, tok, cfg, rows, lengths, warmup: int, device: str):
    """(b) finetune.py's path for train.method=dpo: the plan, apply_lora, the speed switches, trainer_args and
    build_trainer (the reference: the same model with the adapter disabled)."""
    prep = SimpleNamespace(train=SimpleNamespace(rows=rows), eval=SimpleNamespace(rows=[]))
    trainer = method_trainer(base, tok, cfg, prep, lengths, device)
    res = run_trainer(trainer, warmup, device, count=pair_tokens)
    keys = ("rows_per_micro_batch", "gradient_accumulation_steps", "gradient_checkpointing", "use_liger_kernel")
    return {**res, "plan": {k: RESULTS["project_plan"][k] for k in keys}}


def bench(a) -> None:
    import torch

    from ftkit import pairs, train
    from ftkit.config import load_config
    from ftkit.models import load_tokenizer, resolve_model

    device = "cpu" if a.tiny else "cuda"
    model_dir = Path(a.model_dir)
    build_model(model_dir, Path(a.tokenizer), a.tiny)
    pair_file = Path(tempfile.mkdtemp(prefix="pairs-")) / "pairs.jsonl"
    n = make_pairs(Path(a.data), pair_file, a.pairs)
    cfg = load_config(
        CONFIG,
        [
            f"model.name_or_path={model_dir}",
            f"data.path={pair_file}",
            "data.eval_size=0",
            "train.method=dpo",
            f"train.max_steps={a.warmup + a.steps}",
            "train.logging_steps=1",
            "train.save_steps=100000",
            "lora.lora_dropout=0.0",
            "train.eval_steps=null",
        ],
    )
    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    prep = pairs.prepare(cfg, tok)  # sets the run's template on tok: both variants read the same rows
    rows, lengths = prep.train.rows, prep.train.lengths
    RESULTS.update(
        device=torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        tiny=a.tiny,
        config=CONFIG,
        data={"source": a.data, "pairs": n, "kept": len(rows), "mean_pair_tokens": round(sum(lengths) / len(lengths))},
    )
    RESULTS["versions"] = versions()
    base = train.load_quantized_base(cfg, source, offline, device)
    steps = a.warmup + a.steps
    plain = variant("plain_dpo_b8x2", base, plain_dpo, tok, rows, steps, a.warmup, device, cfg.data.max_length)
    if device == "cuda":  # liger patches transformers' modules for the whole process: the run without it first
        off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_liger_kernel": False})})
        variant("project_dpo_yaml_no_liger", base, project_dpo, tok, off, rows, lengths, a.warmup, device)
    proj = variant("project_dpo_yaml", base, project_dpo, tok, cfg, rows, lengths, a.warmup, device)
    if plain and proj:
        RESULTS["summary"] = {
            "ratio_project_vs_plain": round(proj["real_tokens_per_s"] / plain["real_tokens_per_s"], 2),
            "first_losses_agree": abs(plain["first_losses"][0] - proj["first_losses"][0]) < 1e-3,
        }
    RESULTS.save()
    print(json.dumps(RESULTS.get("summary"), indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="smoke run on the CPU (a 2-layer model, the demo rows)")
    p.add_argument("--model-dir", help=f"default {DEFAULTS['model_dir'][0]} (built there once)")
    p.add_argument("--tokenizer", default=".bench/tokenizer")
    p.add_argument("--data", help=f"Alpaca rows to make pairs of (default {DEFAULTS['data'][0]})")
    p.add_argument("--pairs", type=int, help="the first N pairs only (default: all; --tiny: 48)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    run_side_by_side(p.parse_args(argv), DEFAULTS, bench, RESULTS, ROOT, "pt-tiny-")


if __name__ == "__main__":
    main()
