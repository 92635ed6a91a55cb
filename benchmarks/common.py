"""What every benchmark here shares: the Llama-3-8B shape (from ftkit/estimate.py), the results file written
after every variant (a killed run keeps what it measured), the package versions, and freeing GPU memory between
variants."""

from __future__ import annotations

import gc
import json
import platform
from pathlib import Path

from ftkit.estimate import REFERENCE_MODEL

# The calibrated shape lives with the constants fitted on it (the tests use it without the benchmarks).
LLAMA3_8B = REFERENCE_MODEL


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


def run_side_by_side(a, defaults: dict, bench, results: Results, root: Path, prefix: str) -> None:
    """The main of a side-by-side benchmark with a --tiny smoke mode: each option left unset takes its default
    (`defaults`: name -> (GPU value, --tiny value)), the results file is `a.out`, and without --model-dir the tiny
    run builds its model in a temporary folder, removed after."""
    import os
    import shutil
    import tempfile
    import time

    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v[1] if a.tiny else v[0])
    results.out = Path(a.out).resolve()
    os.chdir(root)
    tmp = None
    if a.model_dir is None:
        import torch

        torch.set_num_threads(1)  # a 2-layer model's ops are too small to share between threads
        tmp = tempfile.mkdtemp(prefix=prefix)
        a.model_dir = str(Path(tmp) / "model")
    try:
        t0 = time.time()
        bench(a)
        results["wall_s"] = round(time.time() - t0, 1)
        results.save()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
