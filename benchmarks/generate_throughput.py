"""Generation throughput: plain `model.generate` against this project's decode settings, batch 1 and batch 32.

GPU (the issue's benchmark; see benchmarks/README.md for the exact command and the results):
    python benchmarks/generate_throughput.py --out benchmarks/results/generate_h200.json
  builds the merged Llama-3-8B's exact architecture with random bf16 weights straight on the GPU (nothing saved),
  SDPA attention, then generates greedily from 128-token prompts, 128 new tokens for every row
  (min_new_tokens = max_new_tokens: random weights would otherwise stop at a stray EOS):
    plain:   model.generate as shipped (dynamic KV cache, eager);
    project: inference.generation_kwargs with the product's default settings (inference.cache_implementation
             and inference.compile "auto" = static KV cache + the decode step compiled with torch.compile
             mode "reduce-overhead", i.e. CUDA graphs), the cache sized by inference.static_cache_len, the
             batch built as inference.generate builds it (left-padded ids + attention mask).
  Warm-up runs (compile and CUDA-graph capture) are timed separately and left out of the throughput.
  tokens/s = rows x new tokens / wall time of one generate call (prefill included); decode ms/token =
  (full call - a 1-new-token call) / (new tokens - 1).
CPU (tiny 2-layer model, a correctness smoke run of the same code):
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

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
                 hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02)
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
HBM_TBPS = 4.8  # H200 spec; ~4.3 TB/s measured device-to-device (.library KINDS.md)

RESULTS: dict = {"variants": {}}
OUT: Path | None = None
T0 = time.time()


def save():
    if OUT:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(RESULTS, indent=2) + "\n")


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
    RESULTS["model"] = {"params": n, "weight_gb": round(n * 2 / 1e9, 3), "build_s": round(time.time() - t0, 1),
                        "attn_implementation": model.config._attn_implementation,
                        "dtype": str(next(model.parameters()).dtype)}
    return model


def make_batch(batch: int, prompt_len: int, vocab: int, device: str):
    """What inference.generate hands to model.generate: left-padded ids + mask (all prompts 128 tokens: no pads)."""
    import torch
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, vocab - 100, (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


def gen_kwargs(project: dict | None, new_tokens: int, prompt_len: int, device: str, limit: int, eos: int) -> dict:
    """The kwargs inference.generate passes: from inference.generation_kwargs, with the product's defaults
    (project = {}: inference.cache_implementation and inference.compile "auto") or the plain settings."""
    from ftkit.config import InferenceCfg
    from inference import generation_kwargs, static_cache_len
    icfg = InferenceCfg(max_new_tokens=new_tokens, do_sample=False, device=device,
                        **(project if project is not None else {"cache_implementation": "dynamic", "compile": False}))
    kw = generation_kwargs(icfg, SimpleNamespace(stop_token_ids=[eos]), SimpleNamespace(pad_token_id=eos,
                                                                                        eos_token_id=eos))
    if kw.get("cache_implementation") == "static":
        kw["max_cache_len"] = static_cache_len(prompt_len, new_tokens, limit)
    kw["min_new_tokens"] = new_tokens  # every row generates all of them (random weights)
    return kw


def timed_generate(model, ids, mask, kw, cache) -> tuple[float, object]:
    """One model.generate call as inference.generate makes it (its static cache reset and passed in)."""
    import torch
    sync()
    t0 = time.perf_counter()
    if cache is not None:
        cache.reset()
        kw = dict(kw, past_key_values=cache)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    sync()
    return time.perf_counter() - t0, out


def run_variant(model, name: str, project: bool, batch: int, args, device: str, reps: int) -> dict:
    import torch
    res: dict = {"batch": batch, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens}
    RESULTS["variants"][name] = res
    limit = model.config.max_position_embeddings
    ids, mask = make_batch(batch, args.prompt_len, model.config.vocab_size, device)
    kw = gen_kwargs(json.loads(args.project_settings) if project else None, args.new_tokens, args.prompt_len, device,
                    limit, model.config.eos_token_id)
    res["generate_kwargs"] = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v))
                              for k, v in kw.items()}
    from inference import reusable_cache
    cache = reusable_cache(model, kw)  # static: one StaticCache for every call, as inference.generate does
    res["static_cache_reused"] = cache is not None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Warm-up: the first call compiles and captures CUDA graphs (project) or loads kernels (plain); the second
    # (project) shows that nothing is compiled or captured again.
    warm = []
    for _ in range(2 if project else 1):
        w_kw = kw if project else dict(kw, max_new_tokens=8, min_new_tokens=8)
        dt, _ = timed_generate(model, ids, mask, w_kw, cache)
        warm.append(round(dt, 2))
    res["warmup_s"] = warm
    if project:
        res["compile_and_capture_s"] = round(warm[0] - warm[1], 1)
    fulls, outs = [], None
    for _ in range(reps):
        dt, outs = timed_generate(model, ids, mask, kw, cache)
        fulls.append(dt)
    one_kw = dict(kw, max_new_tokens=1, min_new_tokens=1)
    ones = [timed_generate(model, ids, mask, one_kw, cache)[0] for _ in range(reps)]
    full, one = statistics.median(fulls), statistics.median(ones)
    gen = outs.shape[1] - args.prompt_len
    assert gen == args.new_tokens, f"generated {gen} tokens, expected {args.new_tokens}"
    decode_ms = (full - one) / (args.new_tokens - 1) * 1e3
    res.update({
        "runs_s": [round(x, 4) for x in fulls], "one_token_runs_s": [round(x, 4) for x in ones],
        "tokens_per_s": round(batch * args.new_tokens / full, 1),
        "ms_per_token_step": round(full / args.new_tokens * 1e3, 3),
        "decode_ms_per_step": round(decode_ms, 3),
        "decode_tokens_per_s": round(batch * 1e3 / decode_ms, 1),
        "prefill_plus_first_token_s": round(one, 4),
    })
    if device == "cuda":
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        # Bytes the decode step must read at least: the weights (+ the KV cache), against HBM bandwidth.
        res["decode_bandwidth_tbps"] = round(RESULTS["model"]["params"] * 2 / (decode_ms / 1e3) / 1e12, 2)
    res["first_row_tokens"] = outs[0, args.prompt_len:args.prompt_len + 16].tolist()
    save()
    print(f"[{time.time() - T0:6.0f}s] {name}: {res['tokens_per_s']} tok/s, decode {res['decode_ms_per_step']} "
          f"ms/step, warm-up {warm}", flush=True)
    return res


def reset_compiled(model):
    import torch
    torch._dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        if hasattr(model, attr):
            delattr(model, attr)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: a smoke run of this script")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each project variant (median)")
    ap.add_argument("--project-settings", default="{}",
                    help='InferenceCfg keys over the defaults for the project variant, e.g. \'{"compile": false}\'')
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="skip variants that would not finish within this many seconds of the start")
    args = ap.parse_args(argv)
    OUT = Path(args.out)
    import torch
    import transformers
    device = "cpu" if args.tiny else "cuda"
    RESULTS.update({
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     "triton": getattr(sys.modules.get("triton"), "__version__", None)},
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    })
    try:
        import triton
        RESULTS["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    model = build_model(args.tiny, device)
    save()
    batches = [int(b) for b in args.batches.split(",")]
    compile_s = 0.0
    # Project first (the compile is the long part), then plain; each batch size is compiled fresh, as a
    # process answering a file compiles for its own batch size.
    for b in batches:
        left = args.budget_s - (time.time() - T0)
        if compile_s and left < compile_s * 1.3 + 20:
            RESULTS["variants"][f"project_b{b}"] = {"skipped": f"{left:.0f} s of budget left"}
            continue
        reset_compiled(model)
        try:
            r = run_variant(model, f"project_b{b}", True, b, args, device, args.reps)
            compile_s = max(compile_s, r.get("warmup_s", [0])[0])
        except Exception as e:  # keep what was measured so far
            RESULTS["variants"][f"project_b{b}"]["error"] = f"{type(e).__name__}: {e}"[:2000]
            save()
            print(f"project_b{b} failed: {e}", flush=True)
    reset_compiled(model)
    for b in sorted(batches, reverse=True):
        left = args.budget_s - (time.time() - T0)
        if left < (15 if b == 1 else 30) * (2 if b == 1 else 1):
            RESULTS["variants"][f"plain_b{b}"] = {"skipped": f"{left:.0f} s of budget left"}
            continue
        try:
            run_variant(model, f"plain_b{b}", False, b, args, device, 1)
        except Exception as e:
            RESULTS["variants"][f"plain_b{b}"]["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"plain_b{b} failed: {e}", flush=True)
    v = RESULTS["variants"]
    summary = {}
    for b in batches:
        p, q = v.get(f"plain_b{b}", {}), v.get(f"project_b{b}", {})
        summary[f"b{b}"] = {"plain_tok_s": p.get("tokens_per_s"), "project_tok_s": q.get("tokens_per_s"),
                            "speedup": round(q["tokens_per_s"] / p["tokens_per_s"], 2)
                            if p.get("tokens_per_s") and q.get("tokens_per_s") else None,
                            "project_compile_and_capture_s": q.get("compile_and_capture_s"),
                            "same_first_16_tokens": (p.get("first_row_tokens") == q.get("first_row_tokens"))
                            if p.get("first_row_tokens") and q.get("first_row_tokens") else None}
    targets = {} if args.tiny else {1: 150, 32: 3000}
    for b, t in targets.items():
        if f"b{b}" in summary and summary[f"b{b}"]["project_tok_s"]:
            summary[f"b{b}"]["target"] = t
            summary[f"b{b}"]["target_met"] = summary[f"b{b}"]["project_tok_s"] >= t
    RESULTS["summary"] = summary
    RESULTS["wall_s"] = round(time.time() - T0, 1)
    save()
    print("\n| batch | plain tok/s | project tok/s | speedup | project decode ms/step | compile+capture s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        s, q = summary[f"b{b}"], v.get(f"project_b{b}", {})
        print(f"| {b} | {s['plain_tok_s']} | {s['project_tok_s']} | {s['speedup']} | {q.get('decode_ms_per_step')} "
              f"| {s['project_compile_and_capture_s']} |")


if __name__ == "__main__":
    main()
