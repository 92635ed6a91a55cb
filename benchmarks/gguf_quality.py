"""GGUF exports of one finished run, measured inside llama.cpp: file size, perplexity of the held-out reference
answers, top-1 agreement with the f16 export at every answer position, exact match of greedy answers on the
verifiable held-out tasks, generation speed, and the time each export took.

Every type is exported with export_gguf.py into a scratch folder (the run's own export/ is not touched), then
scored by ftkit.llamacpp.export_quality: the numbers tests/test_llama_cpp.py asserts on, for more types.
--base-types scores the adapter GGUF (--adapter) over the base model at each type (--base), beside the merged
exports. --extra-rows adds rows to the held-out ones (those whose prompt is in a --seen file are dropped), so a
small held-out split does not decide a 90% bar by one or two answers.

    python finetune.py --config configs/demo.yaml paths.output_dir=runs/demo && python merge_adapter.py
    python data/generate_demo_data.py --seed 7 --per-family 40 --out /tmp/fresh.jsonl
    python benchmarks/gguf_quality.py --run runs/demo --base-types q4_k_m,q4_0,q4_0-rtn \
        --extra-rows /tmp/fresh.jsonl --seen data/demo_tasks.jsonl --out benchmarks/results/gguf_quality_cpu.json
Smoke run (make bench-smoke; tests/test_benchmarks.py merges the tests' tiny trained run first): f16, GPTQ q4_0
and the adapter over a q4_0 base, at most 8 extra rows, speed from 16 tokens once, one thread:
    python benchmarks/gguf_quality.py --tiny --run <a small finished run> --extra-rows data/demo_tasks.jsonl \
        --out /tmp/ggq.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import Results, versions  # noqa: E402
from ftkit.config import load_config  # noqa: E402
from ftkit.jsonl import read_jsonl  # noqa: E402
from ftkit.llamacpp import export_quality, load  # noqa: E402
from ftkit.paths import RunDir  # noqa: E402
from ftkit.prompts import PromptTemplate  # noqa: E402
from ftkit.scoring import unseen  # noqa: E402

# (full run, --tiny) defaults
DEFAULTS = {
    "types": ("f16,q8_0,q6_k,q5_k_m,q4_k_m,q5_0,q4_0,q4_0-rtn", "f16,q4_0"),
    "base_types": ("", "q4_0"),
    "extra_limit": (None, 8),
}


def export(run: Path, qtype: str, out: Path, *flags: str) -> float:
    """export_gguf.py into `out`; a type named '<type>-rtn' is written with --calibration-rows 0 (round to
    nearest instead of GPTQ, for q4_0/q5_0), so both can stand side by side in one table."""
    t0 = time.time()
    if qtype.endswith("-rtn"):
        qtype, flags = qtype.removesuffix("-rtn"), (*flags, "--calibration-rows", "0")
    cmd = [sys.executable, str(ROOT / "export_gguf.py"), "--config", str(run / "config.yaml"), "--type", qtype]
    cmd += [*flags, "--outfile", str(out), "--quiet"]
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return time.time() - t0


def em(x: float | None) -> str:
    """Exact match for the table: None (no verifiable row among those scored) as '-'."""
    return f"{x:6.3f}" if x is not None else f"{'-':>6}"


def tokens_per_second(what: Path | tuple[Path, Path], prompt: list[int], n: int = 64, reps: int = 3) -> float:
    """Decode speed: n tokens past the prompt, end-of-turn ignored, best of `reps`."""
    path, lora = what if isinstance(what, tuple) else (what, None)
    llm = load(path, lora=lora)
    best = 0.0
    for _ in range(reps):
        t0 = time.time()
        for i, _tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
            if i == n:
                break
        best = max(best, n / (time.time() - t0))
    llm.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--run", type=Path, required=True, help="a finished run with merged/ (finetune + merge)")
    ap.add_argument(
        "--types",
        help="f16 first: the reference; '-rtn' after q4_0/q5_0: rounded to nearest instead of GPTQ (default "
        f"{DEFAULTS['types'][0]}; --tiny: {DEFAULTS['types'][1]})",
    )
    ap.add_argument(
        "--base-types",
        help=f"the adapter GGUF over the base at these types, e.g. q4_k_m (--tiny: {DEFAULTS['base_types'][1]})",
    )
    ap.add_argument("--tiny", action="store_true", help="a smoke run of a small run: fewer types, one thread")
    ap.add_argument("--extra-rows", type=Path, help="more Alpaca rows (JSONL) to score beside the held-out ones")
    ap.add_argument("--seen", type=Path, nargs="*", default=[], help="JSONL files whose prompts --extra-rows drops")
    ap.add_argument("--extra-limit", type=int, help="score at most this many --extra-rows, the first (--tiny: 8)")
    ap.add_argument("--out", type=Path, help="results JSON")
    a = ap.parse_args()
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, v[1] if a.tiny else v[0])
    if a.tiny:
        # One thread for torch (here and in the exporters) and llama.cpp (ftkit.llamacpp.cpu_threads): a tiny
        # model's ops are too small to share, and on the shared 2-core machine two threads ran llama.cpp ~30x and
        # the GPTQ pass ~20x slower.
        os.environ["OMP_NUM_THREADS"] = "1"
    from transformers import AutoTokenizer

    run = a.run.resolve()
    cfg = load_config(run / "config.yaml")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    template = PromptTemplate.load(run / "prompt_template.json")
    rows = [r for _, r in read_jsonl(RunDir(run).eval_rows, "held-out rows", "")]
    n_held_out = len(rows)
    if a.extra_rows:
        seen = [r for f in a.seen for _, r in read_jsonl(f, "seen rows", "")]
        rows += unseen([r for _, r in read_jsonl(a.extra_rows, "extra rows", "")], seen + rows)[: a.extra_limit]
    res = Results(
        run=str(run), rows=len(rows), held_out_rows=n_held_out, versions=versions(), cpu_count=os.cpu_count(), types={}
    )
    res.out = a.out
    with tempfile.TemporaryDirectory() as tmp:
        files, took = {}, {}
        for t in a.types.split(","):
            files[t] = Path(tmp) / f"{t}.gguf"
            took[t] = export(run, t, files[t])
        if a.base_types:
            lora = Path(tmp) / "lora.gguf"
            took_lora = export(run, "f16", lora, "--adapter")
            for t in a.base_types.split(","):
                files[f"{t}+lora"] = (Path(tmp) / f"base-{t}.gguf", lora)
                took[f"{t}+lora"] = took_lora + export(run, t, files[f"{t}+lora"][0], "--base")
        report = export_quality(files, rows, template, tok, cfg.data.max_length, cfg.inference.max_new_tokens)
        prompt = template.prompt_ids(tok, rows[0]["instruction"], rows[0].get("input") or None)
        for t, r in report.items():
            r.pop("answers")
            r.pop("file")
            r["export_s"] = round(took[t], 1)
            r["generate_tok_s"] = round(tokens_per_second(files[t], prompt, *((16, 1) if a.tiny else ())), 1)
            res["types"][t] = r
            res.save()
    print(f"{'type':12} {'MB':>7} {'ppl':>7} {'top1':>6} {'EM':>6} {'tok/s':>7} {'export s':>8}")
    for t, r in res["types"].items():
        print(
            f"{t:12} {r['size_mb']:7.1f} {r['perplexity']:7.3f} {r['top1_agreement']:6.3f} {em(r['exact_match'])} "
            f"{r['generate_tok_s']:7.1f} {r['export_s']:8.1f}"
        )


if __name__ == "__main__":
    main()
