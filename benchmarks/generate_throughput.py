"""Generation throughput: plain `model.generate` against this project's decode path, batch 1 and batch 32.

GPU (the issue's benchmark; see benchmarks/README.md for the exact command and the results):
    python benchmarks/generate_throughput.py --out benchmarks/results/generate_h200.json
  builds the merged Llama-3-8B's exact architecture with random bf16 weights straight on the GPU (nothing saved),
  SDPA attention, then generates greedily from 128-token prompts, 128 new tokens for every row
  (min_new_tokens = max_new_tokens: random weights would otherwise stop at a stray EOS):
    plain:       model.generate as shipped (dynamic KV cache, eager);
    project:     ftkit.generation.batch_runner with the product's defaults (inference.cache_implementation and
                 inference.compile "auto"), as ftkit.generation.generate calls it: static KV cache sized by
                 ftkit.generation.static_cache_len, greedy decoding through ftkit.generation.graph_generate (the
                 decode step compiled and captured as one CUDA graph);
    hf_compiled: the same settings through model.generate (static cache, transformers' own torch.compile of
                 the forward, mode "reduce-overhead"), for comparison.
  Warm-up runs (compile and CUDA-graph capture) are timed separately and left out of the throughput.
  tokens/s = rows x new tokens / wall time of one generate call (prefill included); decode ms/token =
  (full call - a 1-new-token call) / (new tokens - 1).
CPU (tiny 2-layer model, a correctness smoke run of the same code, every variant: batches 1 and 4, 16-token
prompts, 16 new tokens, one timed run, one thread; make bench-smoke runs it):
    python benchmarks/generate_throughput.py --tiny --out /tmp/gen_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import LLAMA3_8B, Results, versions  # noqa: E402

TINY = dict(
    LLAMA3_8B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
)
# (GPU benchmark, --tiny) defaults
DEFAULTS = {"batches": ("1,32", "1,4"), "prompt_len": (128, 16), "new_tokens": (128, 16), "reps": (3, 1)}
HBM_TBPS = 4.8  # H200 spec; ~4.3 TB/s measured device-to-device (.library KINDS.md)

RESULTS = Results(variants={})
T0 = time.time()


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(tiny: bool, device: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.time()
    cfg = LlamaConfig(**(TINY if tiny else LLAMA3_8B))
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # weights are created and initialised (normal, std 0.02) on the GPU
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.generation_config.pad_token_id = cfg.eos_token_id
    n = sum(p.numel() for p in model.parameters())
    RESULTS["model"] = {
        "params": n,
        "weight_gb": round(n * 2 / 1e9, 3),
        "build_s": round(time.time() - t0, 1),
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
    }
    return model


def make_batch(batch: int, prompt_len: int, vocab: int, device: str):
    """What ftkit.generation.generate hands to model.generate: left-padded ids + mask (all prompts 128 tokens,
    so no pads)."""
    import torch

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, vocab - 100, (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


def gen_kwargs(settings: dict, new_tokens: int, prompt_len: int, device: str, limit: int, eos: int):
    """(icfg, kw) as ftkit.generation.generate makes them: generation_kwargs over InferenceCfg(**settings) ({}: the
    product's defaults), plus the static cache length it would pick."""
    from ftkit.config import InferenceCfg
    from ftkit.generation import generation_kwargs, static_cache_len

    icfg = InferenceCfg(max_new_tokens=new_tokens, do_sample=False, device=device, **settings)
    kw = generation_kwargs(
        icfg, SimpleNamespace(stop_token_ids=[eos]), SimpleNamespace(pad_token_id=eos, eos_token_id=eos)
    )
    if kw.get("cache_implementation") == "static":
        kw["max_cache_len"] = static_cache_len(prompt_len, new_tokens, limit)
    kw["min_new_tokens"] = new_tokens  # every row generates all of them (random weights)
    return icfg, kw


def timed(run, ids, mask) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = run(ids, mask)
    sync()
    return time.perf_counter() - t0, out


PLAIN = {"cache_implementation": "dynamic", "compile": False}


def run_variant(model, name: str, mode: str, batch: int, args, device: str, reps: int) -> dict:
    """mode: "plain" (model.generate, dynamic cache), "project" (ftkit.generation.batch_runner with the product's
    defaults: ftkit.generation.graph_generate on CUDA), "hf_compiled" (the same settings through
    model.generate: static cache, transformers' own compile of the forward, mode reduce-overhead)."""
    import torch

    from ftkit.generation import batch_runner

    res: dict = {"batch": batch, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, "mode": mode}
    RESULTS["variants"][name] = res
    settings = PLAIN if mode == "plain" else json.loads(args.project_settings)
    icfg, kw = gen_kwargs(
        settings,
        args.new_tokens,
        args.prompt_len,
        device,
        model.config.max_position_embeddings,
        model.config.eos_token_id,
    )
    res["settings"] = settings
    res["generate_kwargs"] = {
        k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v)) for k, v in kw.items()
    }
    fast = mode == "project"
    run = batch_runner(model, icfg, kw, fast=fast)
    run_one = batch_runner(model, icfg, dict(kw, max_new_tokens=1, min_new_tokens=1), fast=fast)
    ids, mask = make_batch(batch, args.prompt_len, model.config.vocab_size, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Warm-up: the first call compiles and captures CUDA graphs (project) or loads kernels (plain); the second
    # (compiled modes) shows that nothing is compiled or captured again.
    warm = []
    w_run = run if mode != "plain" else batch_runner(model, icfg, dict(kw, max_new_tokens=8, min_new_tokens=8))
    for _ in range(1 if mode == "plain" else 2):
        warm.append(round(timed(w_run, ids, mask)[0], 2))
    res["warmup_s"] = warm
    if mode != "plain":
        res["compile_and_capture_s"] = round(warm[0] - warm[1], 1)
    fulls, outs = [], None
    for _ in range(reps):
        dt, outs = timed(run, ids, mask)
        fulls.append(dt)
    ones = [timed(run_one, ids, mask)[0] for _ in range(reps)]
    full, one = statistics.median(fulls), statistics.median(ones)
    gen = outs.shape[1] - args.prompt_len
    assert gen == args.new_tokens, f"generated {gen} tokens, expected {args.new_tokens}"
    decode_ms = (full - one) / (args.new_tokens - 1) * 1e3
    res.update(
        {
            "runs_s": [round(x, 4) for x in fulls],
            "one_token_runs_s": [round(x, 4) for x in ones],
            "tokens_per_s": round(batch * args.new_tokens / full, 1),
            "ms_per_token_step": round(full / args.new_tokens * 1e3, 3),
            "decode_ms_per_step": round(decode_ms, 3),
            "decode_tokens_per_s": round(batch * 1e3 / decode_ms, 1),
            "prefill_plus_first_token_s": round(one, 4),
        }
    )
    decoders = getattr(model, "_ftkit_graph_decoders", {})
    if fast and decoders:
        d = decoders.get((batch, kw["max_cache_len"], 1, True)) or next(iter(decoders.values()))
        res["cuda_graph"] = d.graph is not None
        res["capture_error"] = d.capture_error
    if device == "cuda":
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        # The decode step reads at least the weights: bytes / step time, against ~4.3-4.8 TB/s of HBM.
        res["decode_bandwidth_tbps"] = round(RESULTS["model"]["params"] * 2 / (decode_ms / 1e3) / 1e12, 2)
    res["first_row_tokens"] = outs[0, args.prompt_len : args.prompt_len + 32].tolist()
    RESULTS.save()
    print(
        f"[{time.time() - T0:6.0f}s] {name}: {res['tokens_per_s']} tok/s, decode {res['decode_ms_per_step']} "
        f"ms/step, warm-up {warm}" + (f", cuda_graph {res.get('cuda_graph')}" if fast else ""),
        flush=True,
    )
    return res


def reset_compiled(model):
    import torch

    torch._dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_ftkit_graph_decoders"):
        if hasattr(model, attr):
            delattr(model, attr)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="2-layer model on the CPU: a smoke run of this script (defaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v[1]}" for k, v in DEFAULTS.items())
        + ", one thread)",
    )
    ap.add_argument("--batches", help=f"default {DEFAULTS['batches'][0]}")
    ap.add_argument("--prompt-len", type=int, help=f"default {DEFAULTS['prompt_len'][0]}")
    ap.add_argument("--new-tokens", type=int, help=f"default {DEFAULTS['new_tokens'][0]}")
    ap.add_argument(
        "--reps", type=int, help=f"timed runs of each project variant (median; default {DEFAULTS['reps'][0]})"
    )
    ap.add_argument(
        "--project-settings",
        default="{}",
        help="InferenceCfg keys over the defaults for the project variant, e.g. '{\"compile\": false}'",
    )
    ap.add_argument(
        "--no-hf-compiled",
        action="store_true",
        help="skip model.generate with the static cache and transformers' own compile",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=1e9,
        help="skip variants that would not finish within this many seconds of the start",
    )
    args = ap.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v[1] if args.tiny else v[0])
    RESULTS.out = Path(args.out)
    import torch

    if args.tiny:  # a 2-layer model's ops are too small to share between threads
        torch.set_num_threads(1)

    device = "cpu" if args.tiny else "cuda"
    RESULTS.update(
        {
            "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv),
            "versions": versions(),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        }
    )
    model = build_model(args.tiny, device)
    RESULTS.save()
    batches = [int(b) for b in args.batches.split(",")]
    # Project first (the compile is the long part), then plain, then transformers' own compiled generate for
    # comparison; skipped when the budget would run out. Each compiled variant starts from a clean dynamo state.
    plan = [("project", b) for b in batches] + [("plain", b) for b in sorted(batches, reverse=True)]
    plan += [] if args.no_hf_compiled else [("hf_compiled", b) for b in batches]
    compile_s = 45.0
    for mode, b in plan:
        name = f"{mode}_b{b}"
        left = args.budget_s - (time.time() - T0)
        need = (compile_s * 1.2 + 10) if mode != "plain" else (12 + 0.3 * b)
        if left < need:
            RESULTS["variants"][name] = {"skipped": f"{left:.0f} s of budget left, ~{need:.0f} s needed"}
            RESULTS.save()
            continue
        reset_compiled(model)
        try:
            r = run_variant(model, name, mode, b, args, device, args.reps if mode != "plain" else 1)
            if mode != "plain":
                compile_s = max(compile_s, r["warmup_s"][0])
        except Exception as e:  # keep what was measured so far
            RESULTS["variants"][name]["error"] = f"{type(e).__name__}: {e}"[:3000]
            RESULTS.save()
            print(f"{name} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    v = RESULTS["variants"]

    def agree(x, y):  # leading new tokens two variants share (bf16 near-ties with random weights split them)
        x, y = x.get("first_row_tokens"), y.get("first_row_tokens")
        return (
            None if not x or not y else next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        )

    summary = {}
    for b in batches:
        p, q, h = v.get(f"plain_b{b}", {}), v.get(f"project_b{b}", {}), v.get(f"hf_compiled_b{b}", {})
        summary[f"b{b}"] = {
            "plain_tok_s": p.get("tokens_per_s"),
            "project_tok_s": q.get("tokens_per_s"),
            "hf_compiled_tok_s": h.get("tokens_per_s"),
            "speedup": round(q["tokens_per_s"] / p["tokens_per_s"], 2)
            if p.get("tokens_per_s") and q.get("tokens_per_s")
            else None,
            "project_decode_ms_per_step": q.get("decode_ms_per_step"),
            "project_compile_and_capture_s": q.get("compile_and_capture_s"),
            "project_cuda_graph": q.get("cuda_graph"),
            "leading_tokens_equal_project_vs_plain": agree(q, p),
            "leading_tokens_equal_project_vs_hf_compiled": agree(q, h),
        }
    targets = {} if args.tiny else {1: 150, 32: 3000}
    for b, t in targets.items():
        if f"b{b}" in summary and summary[f"b{b}"]["project_tok_s"]:
            summary[f"b{b}"]["target"] = t
            summary[f"b{b}"]["target_met"] = summary[f"b{b}"]["project_tok_s"] >= t
    RESULTS["summary"] = summary
    RESULTS["wall_s"] = round(time.time() - T0, 1)
    RESULTS.save()
    print(
        "\n| batch | plain tok/s | HF static+compile tok/s | project tok/s | speedup | project decode ms/step "
        "| compile+capture s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        s = summary[f"b{b}"]
        print(
            f"| {b} | {s['plain_tok_s']} | {s['hf_compiled_tok_s']} | {s['project_tok_s']} | {s['speedup']} "
            f"| {s['project_decode_ms_per_step']} | {s['project_compile_and_capture_s']} |"
        )


if __name__ == "__main__":
    main()
