"""The q4_0 GGUF export at Llama-3-8B's size: GPTQ rounding (export_gguf.py's default) against round-to-nearest
(--calibration-rows 0), in wall time, peak GPU memory, peak host memory and file size.

No Llama weights exist here, so the merged model is Meta-Llama-3-8B's exact architecture with random bf16 weights,
saved as a run would leave it (merged/, config.yaml, prompt_template.json) with the demo model's tokenizer (its
49k tokens; the other embedding rows are written as padding tokens). GPTQ calibrates on 256 rows of the shipped
demo data. Random weights say nothing of quality (benchmarks/gguf_quality.py measures that on the real demo
model): this measures what the export costs.

    python benchmarks/gguf_export_8b.py --out benchmarks/results/gguf_export_8b_h200.json
    python benchmarks/gguf_export_8b.py --tiny --out /tmp/g8.json  # a 2-layer, hidden-64 model of the same
        # architecture (Llama-3's 128256-token vocabulary kept), both variants, a quick check on a CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import LLAMA3_8B, Results, versions  # noqa: E402
from ftkit.config import load_config  # noqa: E402
from ftkit.paths import atomic_write_json, save_resolved_config  # noqa: E402
from ftkit.prompts import PromptTemplate  # noqa: E402

# --tiny: Llama-3-8B's architecture and vocabulary at a size a CPU exports in seconds
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VARIANTS = {"round_to_nearest": ("--calibration-rows", "0"), "gptq_256_rows": ()}


def build_run(root: Path, tokenizer: Path, tiny: bool) -> Path:
    """A run folder around a random Llama-3-8B-shaped merged model; returns its config.yaml."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA3_8B, **TINY) if tiny else LLAMA3_8B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    merged = root / "merged"
    model.save_pretrained(merged, safe_serialization=True)
    del model
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.save_pretrained(merged)
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"model.name_or_path={merged}",
            f"data.path={ROOT / 'data' / 'demo_tasks.jsonl'}",
            f"paths.output_dir={root}",
        ],
    )
    save_resolved_config(cfg, root / "config.yaml")
    atomic_write_json(root / "prompt_template.json", PromptTemplate.from_config("chat", tok).to_json())
    return root / "config.yaml"


def gpu_memory_used() -> int:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        ).stdout
        return int(out.split()[0]) if out.strip() else 0
    except FileNotFoundError:
        return 0


def timed_export(config: Path, out: Path, *flags: str) -> dict:
    """export_gguf.py in a child, its GPU memory (nvidia-smi, MiB) and resident memory (/proc, MiB) sampled."""
    cmd = [sys.executable, str(ROOT / "export_gguf.py"), "--config", str(config), "--type", "q4_0"]
    cmd += ["--outfile", str(out), *flags]
    idle_gpu = gpu_memory_used()
    peak = {"gpu_mib": 0, "rss_mib": 0}
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def sample():
        while p.poll() is None:
            peak["gpu_mib"] = max(peak["gpu_mib"], gpu_memory_used() - idle_gpu)
            try:
                rss = next(
                    ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines() if ln.startswith("VmRSS")
                )
                peak["rss_mib"] = max(peak["rss_mib"], int(rss.split()[1]) // 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    log = p.communicate()[0]
    watcher.join()
    if p.returncode != 0:
        raise SystemExit(f"export failed ({p.returncode}):\n{log[-4000:]}")
    gptq = [ln for ln in log.splitlines() if "GPTQ" in ln]
    return dict(peak, wall_s=round(time.time() - t0, 1), size_gb=round(out.stat().st_size / 1e9, 3), log=gptq)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="2 layers of hidden size 64 (a smoke run on a CPU)")
    ap.add_argument("--work", type=Path, help="scratch folder, kept and reused (default: a temporary one, removed)")
    ap.add_argument("--only", choices=VARIANTS, help="one variant (two calls on a machine with a time limit)")
    ap.add_argument("--out", type=Path, help="results JSON")
    a = ap.parse_args()
    if a.tiny:
        # One thread here and in the exporter: a 2-layer model's ops are too small to share, and on the shared
        # 2-core machine two threads made the tiny GPTQ pass take 26 s instead of under 1 s.
        os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    if a.tiny:
        torch.set_num_threads(1)

    res = Results(versions=versions(), cpu_count=os.cpu_count(), tiny=a.tiny, variants={})
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res.out = a.out
    work = Path(a.work or tempfile.mkdtemp(prefix="gguf8b-"))
    try:
        config = work / "run" / "config.yaml"
        if not config.is_file():
            t0 = time.time()
            config = build_run(work / "run", a.tokenizer, a.tiny)
            res["build_s"] = round(time.time() - t0, 1)
        for name, flags in VARIANTS.items():
            if a.only and name != a.only:
                continue
            res["variants"][name] = timed_export(config, work / f"{name}.gguf", *flags)
            (work / f"{name}.gguf").unlink()
            res.save()
            print(name, res["variants"][name], flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
