"""Optional kernels chosen by measurement: which GPU trains faster with which kernel, at which micro-batch size.

The table is benchmarks/results/kernel_table.json, written by the benchmark that measured it
(`benchmarks/train_throughput.py --calibrate RESULTS.json`), keyed by the GPU's name as torch reports it:

    {"NVIDIA H200": {"liger": [{"tokens_per_micro_batch": 3302, "on_tokens_per_s": 7534.0,
                                "off_tokens_per_s": 8720.0, "source": "..."}, ...]}}

A kernel is turned on only where the measurements nearest the planned micro-batch say it is faster; a GPU or a
shape the table does not cover gets the kernel off (the plain path every run can take) and a hint to calibrate.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

TABLE_NAME = "benchmarks/results/kernel_table.json"
TABLE = Path(__file__).resolve().parents[1] / TABLE_NAME
# A measurement further than this factor from the planned micro-batch says little about it: launch overhead
# dominates small micro-batches and arithmetic large ones, so a kernel's gain changes sign across that range.
MAX_SHAPE_RATIO = 4.0
# Run-to-run spread of one benchmark row on the H200 is several percent (liger on/off swapped places between
# runs): a median gain under this is no reason to patch the model's modules.
MIN_GAIN = 1.02
CALIBRATE = (
    "python benchmarks/train_throughput.py --only liger_ab --repeat 3 --out /tmp/kt.json && "
    "python benchmarks/train_throughput.py --calibrate /tmp/kt.json --out /tmp/kt_cal.json"
)


@dataclass(frozen=True)
class Verdict:
    on: bool
    reason: str


def load(path: Path | None = None) -> dict:
    """The table, or {} when there is none (a fresh checkout without results)."""
    try:
        table = json.loads(Path(path or TABLE).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def decide(kernel: str, gpu: str, tokens: float, table: dict | None = None) -> Verdict:
    """Whether `kernel` runs faster on `gpu` at about `tokens` real tokens a micro-batch, by the table."""
    table = load() if table is None else table
    rows = [r for r in table.get(gpu, {}).get(kernel, []) if r.get("on_tokens_per_s") and r.get("off_tokens_per_s")]
    hint = f"calibrate this GPU with: {CALIBRATE}"
    if not rows:
        return Verdict(False, f"no {kernel} measurement for GPU {gpu!r} in {TABLE_NAME}: off; {hint}")

    def distance(r) -> float:
        return abs(math.log(r["tokens_per_micro_batch"] / max(tokens, 1.0)))

    near = min(distance(r) for r in rows)
    if near > math.log(MAX_SHAPE_RATIO):
        shapes = sorted({r["tokens_per_micro_batch"] for r in rows})
        return Verdict(
            False,
            f"{kernel} on {gpu} measured at {shapes} tokens a micro-batch, not near {tokens:.0f}: off; measure "
            f"this shape on and off (train_throughput.py liger_on/liger_off groups) and add it with --calibrate",
        )
    same = [r for r in rows if distance(r) - near < 1e-9]
    ratios = [r["on_tokens_per_s"] / r["off_tokens_per_s"] for r in same]
    gain = statistics.median(ratios)
    shown = ", ".join(f"{r['on_tokens_per_s']:.0f} vs {r['off_tokens_per_s']:.0f}" for r in same)
    where = f"at {same[0]['tokens_per_micro_batch']} tokens a micro-batch on {gpu} ({TABLE_NAME}: {shown} tok/s"
    if gain > MIN_GAIN:
        return Verdict(True, f"{kernel} measured faster {where}, median x{gain:.2f})")
    return Verdict(False, f"{kernel} measured no faster {where} with/without, median x{gain:.2f})")


def record(gpu: str, kernel: str, rows: list[dict], path: Path | None = None) -> dict:
    """Add measured rows to the table (a row already there, by source, is replaced) and write it."""
    table = load(path)
    have = table.setdefault(gpu, {}).setdefault(kernel, [])
    sources = {r["source"] for r in rows}
    have[:] = [r for r in have if r.get("source") not in sources] + rows
    Path(path or TABLE).write_text(json.dumps(table, indent=2) + "\n")
    return table
