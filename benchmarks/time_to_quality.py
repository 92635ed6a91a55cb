"""Time to quality: the plain QLoRA recipe against the project's default for configs/llama3_alpaca.yaml (and
the throughput mode, `train.packing=true`, under each learning-rate rule), on real weights
(SmolLM2-135M-Instruct), the same rows and the same held-out split.

Each variant is a real `finetune.py` run (a subprocess, as a user runs it) of --epochs epochs that evaluates
the held-out rows' response loss --evals-per-epoch times an epoch. From its train_log.jsonl (eval_loss,
elapsed_s, eval_runtime) this reports: held-out loss at epoch 1 and at the last epoch (interpolated linearly
between the two evaluations around an epoch boundary), training time with evaluations taken out, and the
training time each variant needs to reach the plain recipe's 1-epoch held-out loss.

  plain       the YAML with every speed switch of the project off: padded batches of the YAML's 8 x 2 rows,
              gradient checkpointing, fp32 upcast of the frozen weights (prepare_model_for_kbit_training),
              plain SDPA, no liger: what a careful user of plain TRL/PEFT runs
  default     configs/llama3_alpaca.yaml as shipped: the same 16 rows a step and learning rate, run as the
              training plan decides (padding-free rows, varlen attention, recompute only if needed, liger,
              fewer larger micro-batches)
  packed_*    the throughput mode: 16k-token packs, learning rate rescaled by none / sqrt / linear

CPU (this 2-core machine; a small split so that it ends in about 20 minutes):
    python benchmarks/time_to_quality.py --out benchmarks/results/ttq_cpu.json --train-rows 48 --eval-rows 16 \
        --eval-every 1 --epochs 3 --variants default,plain --extra data.max_length=256
Smoke run (make bench-smoke; any small model, e.g. the tests' random Llama with the Alpaca prompt): plain,
default and packed_linear (the three code paths; packed_none/sqrt differ from it only in the learning rate), one
epoch of 24 shipped demo rows (8 held out), rows of at most 128 tokens, 256-token packs, one thread:
    python benchmarks/time_to_quality.py --tiny --model <small model> --out /tmp/ttq.json
GPU (nvidia-h200; benchmarks/README.md "Time to quality" has the full recipe):
    python3 benchmarks/time_to_quality.py --out $OUT/ttq_h200.json --model /tmp/smollm2 \
        --data .bench/alpaca_en_1k.json --variants plain,default,packed_none,packed_sqrt,packed_linear
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftkit.jsonl import read_log_rows  # noqa: E402

CONFIG = ROOT / "configs" / "llama3_alpaca.yaml"
# Defaults of the full run and of --tiny (each still overridable on the command line)
FULL = {
    "data": str(ROOT.parent / "shared" / "data" / "alpaca_en_1k.json"),
    "train_rows": 850,
    "eval_rows": 150,
    "epochs": 3,
    "eval_every": 0,
    "variants": "plain,default",
    "extra": [],
}
TINY = {
    "data": str(ROOT / "data" / "demo_tasks.jsonl"),
    "train_rows": 24,
    "eval_rows": 8,
    "epochs": 1,
    "eval_every": 1,
    "variants": "plain,default,packed_linear",
    "extra": ["data.max_length=128", "train.pack_tokens=256"],
}
VARIANTS = {
    "plain": [
        "train.padding_free=false",
        "train.gradient_checkpointing=true",
        "train.use_liger_kernel=false",
        "train.regroup_micro_batches=false",
        "train.upcast_frozen_fp32=true",
    ],
    "default": [],
    "packed_none": ["train.packing=true", "train.lr_scaling=none"],
    "packed_sqrt": ["train.packing=true", "train.lr_scaling=sqrt"],
    "packed_linear": ["train.packing=true", "train.lr_scaling=linear"],
}


def read_rows(path: Path) -> list[dict]:
    """Alpaca rows from a JSON list or a JSONL file (the shipped demo data)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def eval_points(log_rows: list[dict]) -> list[dict]:
    """(training seconds, epoch, held-out loss) at each evaluation; evaluation time taken out."""
    out, eval_s = [], 0.0
    for r in log_rows:
        if "eval_loss" in r:
            eval_s += float(r.get("eval_runtime", 0.0))
            out.append(
                {
                    "train_s": round(float(r["elapsed_s"]) - eval_s, 2),
                    "epoch": float(r["epoch"]),
                    "step": int(r["step"]),
                    "eval_loss": float(r["eval_loss"]),
                }
            )
    return out


def loss_at_epoch(points: list[dict], epoch: float) -> float | None:
    """Held-out loss at `epoch`, linear between the evaluations around it."""
    for a, b in zip(points, points[1:]):
        if a["epoch"] <= epoch <= b["epoch"]:
            if b["epoch"] == a["epoch"]:
                return b["eval_loss"]
            w = (epoch - a["epoch"]) / (b["epoch"] - a["epoch"])
            return a["eval_loss"] + w * (b["eval_loss"] - a["eval_loss"])
    close = [p for p in points if abs(p["epoch"] - epoch) < 0.02]
    return close[-1]["eval_loss"] if close else None


def time_to_loss(points: list[dict], target: float) -> float | None:
    """Training seconds until the held-out loss first reaches `target` (linear between evaluations; the first
    evaluation's time when it is already there, an upper bound)."""
    prev = None
    for p in points:
        if p["eval_loss"] <= target:
            if prev is None:
                return p["train_s"]
            w = (prev["eval_loss"] - target) / (prev["eval_loss"] - p["eval_loss"])
            return round(prev["train_s"] + w * (p["train_s"] - prev["train_s"]), 2)
        prev = p
    return None


def run_variant(name: str, a, data: Path, work: Path) -> dict:
    run = work / name
    steps_per_epoch = -(-a.train_rows // 16)
    every = a.eval_every or (1 if name.startswith("packed") else max(1, steps_per_epoch // a.evals_per_epoch))
    over = [
        f"model.name_or_path={a.model}",
        f"data.path={data}",
        f"data.eval_size={a.eval_rows}",
        "data.prompt_template=alpaca",
        f"train.num_train_epochs={a.epochs}",
        f"train.eval_steps={every}",
        "train.save_steps=100000",
        "train.logging_steps=5",
        f"train.optim={a.optim}",
        "train.warmup_steps=0.03",
        f"paths.output_dir={run}",
        f"paths.latest={work / 'latest'}",
        *a.extra,
        *VARIANTS[name],
    ]
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--config", str(CONFIG), *over]
    print(f"\n=== {name}: {' '.join(over)}", flush=True)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1") if a.tiny else None  # a tiny model's ops are too small to share
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        print(r.stderr[-4000:], flush=True)
        return {
            "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
            "wall_s": round(wall, 1),
        }
    plan = json.loads((run / "plan.json").read_text())
    summary = json.loads((run / "run_summary.json").read_text())
    points = eval_points(read_log_rows(run / "train_log.jsonl"))
    last = points[-1]
    return {
        "rows_per_step": plan["rows_per_step"],
        "learning_rate": plan["learning_rate"],
        "micro_batch": plan["per_device_train_batch_size"],
        "accumulation": plan["gradient_accumulation_steps"],
        "gradient_checkpointing": plan["gradient_checkpointing"],
        "padding_free": plan["padding_free"],
        "attention": plan["attn_implementation"],
        "liger": plan["use_liger_kernel"],
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "process_wall_s": round(wall, 1),
        "train_s": last["train_s"],
        "train_s_per_epoch": round(last["train_s"] / max(summary["epochs"], 1e-9), 2),
        "eval_loss_by_epoch": {str(e): loss_at_epoch(points, float(e)) for e in range(1, int(a.epochs) + 1)},
        "schedule_epochs": a.epochs,
        "points": points,
        "changes": plan["changes"],
    }


def summarize(variants: dict) -> dict:
    """Each variant against the plain recipe: held-out loss at equal epochs, and the training time to reach
    the plain recipe's 1-epoch held-out loss."""
    plain = variants.get("plain", {})
    target = plain.get("eval_loss_by_epoch", {}).get("1")
    s = {"target_loss_plain_epoch1": target}
    if target is None:
        return s
    t_plain = time_to_loss(plain["points"], target)
    for n, r in variants.items():
        if "points" not in r:
            continue
        t = time_to_loss(r["points"], target)
        s[n] = {
            "time_to_plain_epoch1_loss_s": t,
            "speedup_to_quality": round(t_plain / t, 2) if t else None,
            "epochs_to_plain_epoch1_loss": next(
                (round(p["epoch"], 3) for p in r["points"] if p["eval_loss"] <= target), None
            ),
            "schedule_epochs": r.get("schedule_epochs"),
            "train_s_per_epoch": r["train_s_per_epoch"],
            "loss_vs_plain_at_epoch": {
                e: round(x / plain["eval_loss_by_epoch"][e], 4)
                for e, x in r["eval_loss_by_epoch"].items()
                if x and plain["eval_loss_by_epoch"].get(e)
            },
        }
    return s


def merge(files: list[str], out: Path) -> None:
    """One result file from several runs (later files win per variant), with the summary recomputed."""
    res: dict = {"merged_from": files, "variants": {}}
    for f in files:
        d = json.loads(Path(f).read_text())
        res.update({k: v for k, v in d.items() if k not in ("variants", "summary")})
        res["variants"].update(d["variants"])
    res["summary"] = summarize(res["variants"])
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["summary"], indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=str(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument(
        "--data",
        help="Alpaca rows, a JSON list or JSONL (default: ../shared/data/alpaca_en_1k.json; --tiny: the shipped "
        "data/demo_tasks.jsonl)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke run (give a small --model): "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()),
    )
    p.add_argument("--gguf", help="convert this GGUF file to --model first (when --model does not exist yet)")
    p.add_argument("--train-rows", type=int, help="default 850")
    p.add_argument("--eval-rows", type=int, help="default 150")
    p.add_argument("--epochs", type=float, help="default 3")
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: --evals-per-epoch)")
    p.add_argument("--optim", default="adamw_torch", help="the same optimizer for every variant")
    p.add_argument("--variants", help="default plain,default")
    p.add_argument("--extra", nargs="*", help="more overrides for every variant")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier result files into --out and stop")
    a = p.parse_args(argv)
    for k, v in (TINY if a.tiny else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.merge:
        return merge(a.merge, Path(a.out))
    if a.gguf and not Path(a.model).exists():
        from ftkit.models import convert_gguf_file

        convert_gguf_file(Path(a.gguf), Path(a.model))
    rows = read_rows(Path(a.data))[: a.train_rows + a.eval_rows]
    out = Path(a.out)
    res = {
        "model": a.model,
        "data": a.data,
        "train_rows": a.train_rows,
        "eval_rows": a.eval_rows,
        "epochs": a.epochs,
        "optim": a.optim,
        "config": str(CONFIG.relative_to(ROOT)),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
        "variants": {},
    }
    try:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        res["torch"] = torch.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "rows.json"
        data.write_text(json.dumps(rows))
        for name in a.variants.split(","):
            res["variants"][name] = run_variant(name, a, data, work)
            res["summary"] = summarize(res["variants"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2) + "\n")
            print(name, json.dumps({k: v for k, v in res["variants"][name].items() if k != "points"}), flush=True)
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
