"""Training throughput: the plain HF/TRL QLoRA recipe against this project's finetune.py path, side by side.

GPU (the issue's benchmark; see benchmarks/README.md for the exact command and the results):
    python benchmarks/train_throughput.py --out benchmarks/results/h200.json \
        --tokenizer .bench/tokenizer --data .bench/alpaca_en_1k.json
  builds Llama-3-8B's exact architecture with random weights once (safetensors, --model-dir), loads it in
  4-bit NF4 + double quant through finetune.py's own loader (ftkit.train.load_quantized_base:
  ftkit.quant.build_bnb_config), then trains, on the same base:
    (a) plain: TRL SFTTrainer defaults, per-batch padding, SDPA, gradient checkpointing, LoRA r=16 on all
        seven projections, batch 2 x accumulation 4;
    (b) project: ftkit.train (apply_lora, sft_config) + ftkit.plan (padding-free rows with varlen
        attention, liger kernels, no fp32 upcast, packing, checkpointing only where needed), at the same
        8 rows per step and at its own packed default;
  on Alpaca-shaped rows (the token lengths of --data under the Alpaca template) and on fixed 2048-token rows;
  and finds the longest single row each path trains.
CPU (configs/demo.yaml, a few steps of each):
    python benchmarks/train_throughput.py --cpu --out benchmarks/results/cpu_demo.json
Smoke run (make bench-smoke, tests/test_benchmarks.py): every variant of the GPU benchmark above, on the CPU, on
a 2-layer model of Llama-3-8B's architecture (hidden 64) built the same way, the shipped demo rows, short fixed
rows, small packs and probes, one timed step each (well under a minute on 2 cores):
    python benchmarks/train_throughput.py --tiny --tokenizer .cache/models/SmolLM2-135M-Instruct --out /tmp/tt.json
  and the CPU demo comparison on any small model:
    python benchmarks/train_throughput.py --cpu --tiny --model-dir <model> --out /tmp/tt_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import LLAMA3_8B, Results, free, versions  # noqa: E402

# --tiny: Llama-3-8B's architecture at a size a CPU trains in milliseconds a step (vocab: the tokenizer's)
TINY_SHAPE = dict(
    LLAMA3_8B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
# --tiny's defaults (each still overridable on the command line) beside the GPU benchmark's
DEFAULTS = {
    "model_dir": ("/tmp/llama3-8b-random", None),  # None: a temporary folder, removed at the end
    "data": (".bench/alpaca_en_1k.json", "data/demo_tasks.jsonl"),
    "warmup": (2, 1),
    "steps": (8, 1),
    "rows": (0, 96),
    "fixed_rows": (96, 64),
    "fixed_len": (2048, 128),
    "pack_tokens": ([4096, 16384, 24576], [512, 1024]),
    "throughput_pack": (16384, 1024),
    "plain_probe": ([65536], [256]),
    "project_probe": ([65536], [256]),
    "offload_probe": ([65536], [256]),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on the H200 (.library KINDS.md); the MFU denominator

RESULTS = Results()
# What the CPU cannot run at all (--tiny records these under "skipped", with the reason, instead of measuring)
CUDA_ONLY = {
    "project_yaml_attn_flex_attention": "FlexAttention has no backward pass on the CPU",
    "project_long_tiled_offload32": "activation offloading moves GPU memory to the host: CUDA only",
}


def build_model(model_dir: Path, tokenizer_dir: Path, tiny: bool = False) -> None:
    """Llama-3-8B's config with random weights, saved once as safetensors with a tokenizer (`tiny`: the same
    architecture at TINY_SHAPE's size, on the CPU, its vocabulary and special tokens the tokenizer's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").is_file():
        return
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tiny:
        cfg = LlamaConfig(
            **dict(TINY_SHAPE, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        )
    else:
        cfg = LlamaConfig(**LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(prev)
    model.config.dtype = torch.bfloat16
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(tmp)  # the tokenizer's files only (a model folder given as --tokenizer keeps its weights)
    del model
    free()
    tmp.rename(model_dir)
    RESULTS["model_build_s"] = round(time.time() - t0, 1)


# -- measurement --------------------------------------------------------------------------------------
class Counter:
    """Wraps a collator: counts the real (non-padding) tokens of every row it batches (`count`: a row's tokens,
    by default its input_ids; a preference pair's are both sides)."""

    def __init__(self, collator, count=None):
        self.collator, self.tokens, self.rows = collator, 0, 0
        self.count = count or (lambda f: len(f["input_ids"]))

    def __call__(self, features):
        self.tokens += sum(self.count(f) for f in features)
        self.rows += len(features)
        return self.collator(features)


def timer_callback(counter: Counter, sync: bool):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """A step's batches are fetched before on_step_begin, so steps are timed end to end: from one step's
        end to the next one's, which includes fetching and collating."""

        marks: list = []

        def on_step_end(self, args, state, control, **kw):
            if sync:
                import torch

                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), counter.tokens, counter.rows))

    return Timer()


def run_trainer(trainer, warmup: int, device: str, count=None) -> dict:
    import torch

    counter = Counter(trainer.data_collator, count)
    trainer.data_collator = counter
    tm = timer_callback(counter, device == "cuda")
    tm.marks = []
    trainer.add_callback(tm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    m = tm.marks
    (ta, ka, ra), (tb, kb, rb) = m[warmup - 1], m[-1]
    n = len(m) - warmup
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "steps_timed": n,
        "step_s": round((tb - ta) / n, 4),
        "real_tokens_per_s": round((kb - ka) / (tb - ta), 1),
        "real_tokens_per_step": round((kb - ka) / n, 1),
        "rows_per_step": round((rb - ra) / n, 2),
        "first_losses": losses[:3],
        "wall_s": round(wall, 1),
    }
    if device == "cuda":
        out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    return out


def reset_base(base) -> None:
    """The base model back as loaded: LoRA layers removed (as PEFT's unload does), checkpointing and the
    input-grad hook off, everything frozen; works after a failed run too."""
    for mod in list(base.modules()):
        for cname, child in list(mod.named_children()):
            if hasattr(child, "base_layer") and hasattr(child, "lora_A"):
                setattr(mod, cname, child.get_base_layer())
    for fn in ("gradient_checkpointing_disable", "disable_input_require_grads"):
        try:
            getattr(base, fn)()
        except Exception:
            pass
    for p in base.parameters():
        p.requires_grad_(False)
    from ftkit import patches

    patches.unwrap_calls(base)  # the tiled MLP and the offloading, if a variant turned them on
    base.train()


# -- the two paths ------------------------------------------------------------------------------------
def plain_trainer(base, tok, rows, steps: int, device: str, batch=2, accum=4, max_length=1024):
    """(a) The plain recipe: TRL SFTTrainer defaults (padded batches, gradient checkpointing, SDPA) around a
    PEFT config; batch 2 x 4 as the benchmark has always run it, or the YAML's own 8 x 2."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**plain_args(steps, device, batch, accum, max_length))
    return SFTTrainer(
        model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=plain_lora()
    )


def plain_args(steps: int, device: str, batch: int, accum: int, max_length: int) -> dict:
    """The plain recipe's TRL arguments, as a user of TRL's defaults writes them (every trainer config takes them)."""
    return dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        max_length=max_length,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )


def plain_lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


UNSLOTH_TIMEOUT_S = int(os.environ.get("UNSLOTH_TIMEOUT_S", "360"))
UNSLOTH_SITE_ENV = "UNSLOTH_SITE"  # a folder holding Unsloth and its own trl/datasets pins (benchmarks/README.md)


def unsloth_missing(site: str | None) -> str | None:
    """Why the unsloth variant cannot run here (None: it can). Unsloth pins trl<=1.15 and datasets<5, which the
    project's trl 1.16 excludes, so it lives in its own folder (`site`) and runs in a child process."""
    import importlib.util

    if site and not (Path(site) / "unsloth" / "__init__.py").is_file():
        return f"unsloth is not importable: no unsloth package in {UNSLOTH_SITE_ENV}={site}"
    if not site and importlib.util.find_spec("unsloth") is None:
        return (
            f"unsloth is not importable: not installed here and {UNSLOTH_SITE_ENV} is unset "
            "(install the unsloth and unsloth_zoo wheels with pip --target DIR, then UNSLOTH_SITE=DIR)"
        )
    return None


def unsloth_variant(model_dir: Path, rows, steps: int, warmup: int, batch: int, accum: int, max_length: int):
    """Unsloth's FastLanguageModel on the same saved base (4-bit NF4 + double quant, its own loader), the same
    LoRA (r16, alpha 32, no dropout, seven projections), rows, batch and TRL settings as the plain 8 x 2 variant,
    timed by the same callback; in a child process whose sys.path puts Unsloth's pins first."""
    import subprocess

    site = os.environ.get(UNSLOTH_SITE_ENV)
    work = Path(tempfile.mkdtemp(prefix="tt-unsloth-"))
    spec = dict(
        model_dir=str(model_dir),
        rows=rows,
        steps=steps,
        warmup=warmup,
        batch=batch,
        accum=accum,
        max_length=max_length,
        out=str(work / "result.json"),
    )
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    # cwd: Unsloth writes its compiled-module cache into the working directory
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        spec["out"],
        "--unsloth-child",
        str(work / "spec.json"),
    ]
    try:  # a hung child (a network call Unsloth makes offline, say) must not take the other variants with it
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=UNSLOTH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise RuntimeError(f"unsloth child timed out after {UNSLOTH_TIMEOUT_S} s:\n" + tail[-3000:]) from None
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode or not Path(spec["out"]).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-25:]
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"unsloth child exited {proc.returncode}:\n" + "\n".join(tail))
    res = json.loads(Path(spec["out"]).read_text())
    shutil.rmtree(work, ignore_errors=True)
    return res


def unsloth_child(spec_path: str) -> None:
    """The child's side of unsloth_variant: train, time, write the result; an uncaught error is its report."""
    spec = json.loads(Path(spec_path).read_text())
    import importlib

    importlib.import_module("unsloth")  # before trl and transformers: it patches them on import
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        spec["model_dir"], max_seq_length=spec["max_length"], dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",  # Unsloth's own offloaded checkpointing, as its guides set it
        random_state=42,
    )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["accum"],
        max_steps=spec["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        max_length=spec["max_length"],
        disable_tqdm=True,
        bf16=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(spec["rows"]), processing_class=tok)
    r = run_trainer(trainer, spec["warmup"], "cuda")
    from importlib.metadata import version

    r["versions"] = {m: version(m) for m in ("unsloth", "unsloth_zoo", "trl", "datasets", "transformers")}
    r["quant"] = str(getattr(model.config, "quantization_config", None))[:400]
    r["attn"] = getattr(model.config, "_attn_implementation", "?")
    Path(spec["out"]).write_text(json.dumps(r))


def project_trainer(
    base,
    tok,
    rows,
    lengths,
    steps: int,
    device: str,
    overrides: list[str],
    config: str,
    plan_override: dict | None = None,
):
    """(b) finetune.py's path: its config, training plan, apply_lora, sft_config and speed switches.
    `plan_override` replaces planned values, for ablations the plan itself would never choose."""
    import dataclasses

    from datasets import Dataset
    from trl import SFTTrainer

    from ftkit import train
    from ftkit.config import load_config
    from ftkit.paths import RunDir
    from ftkit.plan import detect_hardware, make_plan

    cfg = load_config(
        config,
        [
            f"train.max_steps={steps}",
            "train.logging_steps=1",
            "train.save_steps=100000",
            "lora.lora_dropout=0.0",
            "train.eval_steps=null",
            *overrides,
        ],
    )
    plan = make_plan(cfg, detect_hardware(device), lengths, base.config, eval_rows=0)
    if plan_override:
        plan = dataclasses.replace(plan, **plan_override)
    model = train.apply_lora(cfg, plan, base)[0]  # (model, trainable, total, initial weights)
    train.apply_speed_switches(plan, model)
    args = train.sft_config(cfg, RunDir(Path(tempfile.mkdtemp())), plan)
    args.disable_tqdm = True
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer, plan.to_json()


def mfu(tokens_per_s: float, n_params: int, recompute: bool) -> dict:
    f = (6 if recompute else 4) * n_params
    return {"flops_per_token": f, "mfu": round(tokens_per_s * f / (PEAK_TFLOPS * 1e12), 4)}


def variant(name: str, base, fn, *a, **kw) -> dict | None:
    """Run one measurement on `base`; a failure is recorded, not fatal; the base is reset after it."""
    import torch

    t0 = time.time()
    print(f"\n=== {name}", flush=True)
    res, err = None, None
    try:
        res = fn(base, *a, **kw)
    except torch.OutOfMemoryError as e:
        err = "OOM: " + str(e).splitlines()[0][:200]
    except Exception as e:  # recorded in the JSON, the run goes on
        err = f"{type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc()
    reset_base(base)
    RESULTS.setdefault("variants", {})[name] = res if res is not None else {"error": err}
    RESULTS["variants"][name]["elapsed_s"] = round(time.time() - t0, 1)
    print(name, json.dumps(RESULTS["variants"][name]), flush=True)
    RESULTS.save()
    free()
    return res


def method_trainer(base, tok, cfg, prep, lengths, device: str, args_update: dict | None = None, reward_funcs=()):
    """finetune.py's path for a method other than SFT as the side-by-side benchmarks take it: the plan (kept in the
    results), apply_lora, the speed switches, trainer_args (`args_update`: a variant's own settings on top) and
    build_trainer on `prep`'s rows."""
    from ftkit import train
    from ftkit.paths import RunDir
    from ftkit.plan import detect_hardware, make_plan

    plan = make_plan(cfg, detect_hardware(device), lengths, base.config, eval_rows=0)
    RESULTS["project_plan"] = plan.to_json()
    model = train.apply_lora(cfg, plan, base)[0]
    train.apply_speed_switches(plan, model)
    args = train.trainer_args(cfg, RunDir(Path(tempfile.mkdtemp())), plan)
    args.disable_tqdm = True
    for k, v in (args_update or {}).items():
        setattr(args, k, v)
    return train.build_trainer(cfg, model, args, tok, prep, [], reward_funcs)


# -- GPU benchmark (--tiny: the same on the CPU) --------------------------------------------------------
def gpu_main(a) -> None:
    import torch

    from ftkit import data as data_stage
    from ftkit import estimate, train
    from ftkit.config import load_config
    from ftkit.models import load_tokenizer, resolve_model

    device = "cpu" if a.tiny else "cuda"
    cuda = device == "cuda"
    model_dir = Path(a.model_dir)
    build_model(model_dir, Path(a.tokenizer), a.tiny)
    RESULTS["device"] = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"
    RESULTS["tiny"] = a.tiny
    RESULTS["versions"] = versions()
    RESULTS["host_mem_available_gb"] = round((estimate.host_memory_available() or 0) / 1e9, 1)
    if cuda:
        RESULTS["gpu_total_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    base_over = [
        f"model.name_or_path={model_dir}",
        f"data.path={a.data}",
        "data.eval_size=0",
        "data.max_length=1024",
        "data.prompt_template=alpaca",
    ]
    cfg = load_config(a.config, base_over)
    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    prep = data_stage.prepare(cfg, tok)
    rows, lengths = prep.train.rows, prep.train.lengths
    if a.rows:  # --rows: the first rows only (the smoke run: fewer rows for every trainer to take in)
        rows, lengths = rows[: a.rows], lengths[: a.rows]
    RESULTS["data"] = {
        "source": a.data,
        "rows": len(rows),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "max_tokens": max(lengths),
        "tokenizer": f"{a.tokenizer} ({len(tok)} ids; model vocab {cfg_vocab(model_dir)})",
    }
    t0 = time.time()
    base = train.load_quantized_base(cfg, source, offline, device)
    RESULTS["load_4bit_s"] = round(time.time() - t0, 1)
    nums = estimate.model_numbers(base.config, 16, TARGETS)
    RESULTS["params"] = nums["params"]
    if cuda:
        RESULTS["static_gb_after_load"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    RESULTS.save()
    N = nums["params"]
    g = torch.Generator().manual_seed(7)
    top = min(49000, len(tok) - 1)  # random ids of the tokenizer's range (the SmolLM2 BPE: below 49152)
    fixed = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(10, top, (a.fixed_rows, a.fixed_len), generator=g).tolist()
    ]
    W, S = a.warmup, a.steps
    FL = a.fixed_len

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def plain(base, data, batch, accum, max_length, steps):
        tr = plain_trainer(base, tok, data, steps, device, batch, accum, max_length)
        r = run_trainer(tr, W, device)
        r.update(mfu(r["real_tokens_per_s"], N, True))
        return r

    def unsloth_result(model_dir, data, steps):
        r = unsloth_variant(model_dir, data, steps, W, 8, 2, 1024)
        r.update(mfu(r["real_tokens_per_s"], N, True))
        return r

    def project(base, data, lens, overrides, steps, config=a.config, plan_override=None):
        liger_err = None
        try:
            tr, info = project_trainer(base, tok, data, lens, steps, device, overrides, config, plan_override)
            r = run_trainer(tr, W, device)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # liger-kernel and this transformers may disagree: measure without it
            if "train.use_liger_kernel=false" in overrides:
                raise
            traceback.print_exc()
            liger_err = f"{type(e).__name__}: {str(e)[:300]}"
            tr = None
            reset_base(base)
            free()
            overrides = [*overrides, "train.use_liger_kernel=false"]
            tr, info = project_trainer(base, tok, data, lens, steps, device, overrides, config, plan_override)
            r = run_trainer(tr, W, device)
        if liger_err:
            r["first_attempt_error"] = liger_err
        r["kernels"] = {
            "lm_forward": getattr(base.forward, "__module__", "?"),
            "rmsnorm": type(base.model.norm).__module__ + "." + getattr(base.model.norm.forward, "__qualname__", "?"),
            "attn": base.config._attn_implementation,
        }
        r["liger_active"] = "Liger" in r["kernels"]["rmsnorm"]  # what ran, not what was asked (see liger_ab)
        r["switches"] = {k: v for k, v in info.items() if k not in ("estimate", "estimate_largest", "changes")}
        r["estimate"] = info["estimate"]
        r.update(mfu(r["real_tokens_per_s"], N, bool(info["gradient_checkpointing"])))
        return r

    def peak_gb():  # GPU memory only; the CPU smoke run records none
        return {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)} if cuda else {}

    def probe_plain(base, L):
        row = [{"input_ids": torch.randint(10, top, (L,)).tolist()}]
        row[0]["labels"] = row[0]["input_ids"]
        tr = plain_trainer(base, tok, row, 1, device, 1, 1, None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        tr.train()
        sync()
        return {"L": L, **peak_gb(), "step_s": round(time.perf_counter() - t, 2)}

    def probe_project(base, L, overrides):
        row = [{"input_ids": torch.randint(10, top, (L,)).tolist()}]
        row[0]["labels"] = row[0]["input_ids"]
        tr, info = project_trainer(base, tok, row, [L], 1, device, ["train.packing=false", *overrides], a.config)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        host0 = host_pinned_peak(reset=True) if cuda else None
        t = time.perf_counter()
        tr.train()
        sync()
        out = {
            "L": L,
            **peak_gb(),
            "step_s": round(time.perf_counter() - t, 2),
            "gc": info["gradient_checkpointing"],
            "tiled_mlp": info["tiled_mlp"],
            "offload_layers": info["offload_layers"],
            "loss": tr.state.log_history[0].get("loss") if tr.state.log_history else None,
            "pred_peak_gb": info["estimate"]["predicted_peak_gb"],
            "pred_host_gb": info["estimate"]["host_offload_gb"],
            "pred_step_s": info["estimate"]["predicted_step_s"],
        }
        if host0 is not None:
            out["host_pinned_peak_gb"] = round(host_pinned_peak() / 1e9, 3)
        return out

    only = set(a.only.split(",")) if a.only else None

    def want(n):
        return only is None or n in only

    # (a) plain recipe first: the project path patches modules in place (liger)
    if want("plain_alpaca"):
        variant("plain_alpaca_b2x4", base, plain, rows, 2, 4, 1024, W + S)
    if want("plain_fixed"):
        variant(f"plain_fixed{FL}_b2x4", base, plain, fixed, 2, 4, FL, W + max(3, S // 2))
    if want("plain_long"):
        for L in a.plain_probe:
            variant(f"plain_long_{L}", base, probe_plain, L)
    # The YAML's own 16 rows a step (configs/llama3_alpaca.yaml, 8 x 2): plain TRL as a careful user runs it,
    # then the project's default plan and, from it, one switch at a time. The optimizer is 8-bit AdamW
    # everywhere the project runs (the YAML's paged variant takes managed memory, which this GPU host forbids).
    yaml_cfg = str(ROOT / "configs" / "llama3_alpaca.yaml")
    yaml_over = ["train.optim=adamw_bnb_8bit", "data.max_length=1024"]
    if want("plain_yaml"):
        variant("plain_trl_yaml_b8x2_gc", base, plain, rows, 8, 2, 1024, W + S)
    if want("unsloth_yaml"):
        why_not = unsloth_missing(os.environ.get(UNSLOTH_SITE_ENV)) or (None if cuda else "Unsloth needs a CUDA GPU")
        if why_not:
            RESULTS.setdefault("skipped", {})["unsloth_yaml_b8x2"] = why_not
        else:  # the child loads its own 4-bit copy from model_dir; `base` stays as it is
            variant("unsloth_yaml_b8x2", base, lambda _b: unsloth_result(model_dir, rows, W + S))
    if want("project_yaml"):
        variant("project_yaml_default", base, project, rows, lengths, yaml_over, W + S, yaml_cfg)
        ablations = {
            "attn_sdpa_dense_mask": ([], {"attn_implementation": "sdpa"}),
            "attn_flex_attention": (["model.attn_implementation=flex_attention"], None),
            "no_liger": (["train.use_liger_kernel=false"], None),
            "checkpointing": (["train.gradient_checkpointing=true"], None),
            "micro_b8x2": (["train.regroup_micro_batches=false"], None),
            "micro_b8x2_checkpointing": (
                ["train.regroup_micro_batches=false", "train.gradient_checkpointing=true"],
                None,
            ),
            "padded": (["train.padding_free=false"], None),
        }
        for n, (over, po) in ablations.items():
            if not cuda and f"project_yaml_{n}" in CUDA_ONLY:
                RESULTS.setdefault("skipped", {})[f"project_yaml_{n}"] = CUDA_ONLY[f"project_yaml_{n}"]
            elif n == "no_liger" and cuda and (not a.ablations or n in a.ablations.split(",")):
                # the default ran liger in this process and it stays patched: off is only off in a fresh one
                variant("project_yaml_no_liger", base, lambda _b: liger_child(a, model_dir, "off"))
            elif not a.ablations or n in a.ablations.split(","):
                variant(f"project_yaml_{n}", base, project, rows, lengths, yaml_over + over, W + S, yaml_cfg, po)
    # Liger patches transformers' Llama modules for the whole process (the norms of a model built later run
    # LigerRMSNorm too), so liger off is only off in a process that never turned it on: each side of the
    # comparison runs in a fresh child process, sides alternating so a slow spell lands on both.
    for side in ("on", "off"):
        if only and f"liger_{side}" in only:  # one side, in this (fresh) process: what liger_ab starts
            over = [*yaml_over, f"train.use_liger_kernel={'true' if side == 'on' else 'false'}"]
            variant(f"project_yaml_liger_{side}", base, project, rows, lengths, over, W + S, yaml_cfg)
    if only and "liger_ab" in only:  # asked for by name only: liger has no CPU path for the smoke run to take
        for rep in range(a.repeat):
            for side in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                variant(f"project_yaml_liger_{side}_r{rep}", base, lambda _b, s=side: liger_child(a, model_dir, s))
    if want("project_throughput"):
        variant(
            f"project_throughput_pack{a.throughput_pack}",
            base,
            project,
            rows,
            lengths,
            [f"train.pack_tokens={a.throughput_pack}", "train.gradient_accumulation_steps=1"],
            W + S,
        )
    # (b) the project's path
    same = ["train.packing=false", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1"]
    if want("project_same"):
        variant(
            "project_alpaca_same_b8x1_gc",
            base,
            project,
            rows,
            lengths,
            same + ["train.gradient_checkpointing=true"],
            W + S,
        )
        variant(
            "project_alpaca_same_b4x2_gc",
            base,
            project,
            rows,
            lengths,
            [
                "train.packing=false",
                "train.per_device_train_batch_size=4",
                "train.gradient_accumulation_steps=2",
                "train.gradient_checkpointing=true",
            ],
            W + S,
        )
        variant(
            "project_alpaca_same_b8x1_nogc",
            base,
            project,
            rows,
            lengths,
            same + ["train.gradient_checkpointing=false"],
            W + S,
        )
    if want("project_default"):
        for pt in a.pack_tokens:
            variant(
                f"project_alpaca_pack{pt}",
                base,
                project,
                rows,
                lengths,
                [f"train.pack_tokens={pt}", "train.gradient_accumulation_steps=1"],
                W + S,
            )
    if want("project_fixed"):
        variant(
            f"project_fixed{FL}_pack{a.throughput_pack}",
            base,
            project,
            fixed,
            [FL] * len(fixed),
            [f"train.pack_tokens={a.throughput_pack}", "train.gradient_accumulation_steps=1"],
            W + S,
        )
    # Long rows with checkpointing forced on: (group, result name, probe lengths, tiled MLP, offloading)
    long_rows = [
        ("project_long", "project_long", a.project_probe, False, False),
        ("project_long_tiled", "project_long_tiled", a.project_probe, True, False),
        ("project_long_offload", "project_long_tiled_offload32", a.offload_probe, True, True),
    ]
    for group, name, probe, tiled, offload in long_rows:
        if want(group) and not cuda and name in CUDA_ONLY:
            RESULTS.setdefault("skipped", {})[name] = CUDA_ONLY[name]
        elif want(group):
            for L in probe:
                switches = [
                    f"train.tiled_mlp={str(tiled).lower()}",
                    f"train.activation_offloading={str(offload).lower()}",
                ]
                variant(f"{name}_{L}", base, probe_project, L, ["train.gradient_checkpointing=true", *switches])
    if want("project_long_auto"):
        for L in a.auto_probe:  # what finetune.py picks by itself for one row this long
            variant(f"project_long_auto_{L}", base, probe_project, L, [])
    if want("contamination"):
        variant("contamination_check", base, contamination_check, rows[:6], device)
    summarize()


def cfg_vocab(model_dir: Path) -> int | None:
    return json.loads((model_dir / "config.json").read_text()).get("vocab_size")


def contamination_check(base, rows, device: str = "cuda"):
    """On the 8B model with the project's attention: per-row losses of a packed row vs each row alone, beside
    the kernel noise floor (a row alone through SDPA vs through the varlen kernel) and a contaminated control
    (the packed row under plain causal SDPA with an all-ones mask: rows attend across boundaries)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ftkit import attention

    attention.use_varlen_attention(base)
    base.eval()
    coll = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = {
        k: (v.to(device) if torch.is_tensor(v) else v)
        for k, v in coll([{"input_ids": r["input_ids"]} for r in rows]).items()
    }
    fwd = {k: v for k, v in batch.items() if k not in ("labels", "seq_idx")}

    def row_losses(hidden):
        out, start = [], 0
        for r in rows:
            n = len(r["input_ids"])
            ids = torch.tensor(r["input_ids"], device=device)
            out.append(
                torch.nn.functional.cross_entropy(base.lm_head(hidden[start : start + n - 1]).float(), ids[1:]).item()
            )
            start += n
        return out

    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        packed = row_losses(base.model(**fwd).last_hidden_state[0])
        alone, alone_varlen = [], []
        for r in rows:
            ids = torch.tensor([r["input_ids"]], device=device)
            n = ids.shape[1]
            alone += row_losses_one(base, ids)
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            h = base.model(
                input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n
            ).last_hidden_state[0]
            alone_varlen.append(torch.nn.functional.cross_entropy(base.lm_head(h[:-1]).float(), ids[0, 1:]).item())
        base.set_attn_implementation("sdpa")
        mixed = row_losses(
            base.model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                attention_mask=torch.ones_like(batch["input_ids"]),
            ).last_hidden_state[0]
        )
        attention.use_varlen_attention(base)
    base.train()

    def rel(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(a, b))

    return {
        "loss_alone": alone,
        "loss_packed": packed,
        "loss_contaminated_control": mixed,
        "max_rel_diff_packed_vs_alone": rel(alone, packed),
        "max_rel_diff_noise_floor_sdpa_vs_varlen_alone": rel(alone, alone_varlen),
        "max_rel_diff_contaminated_control": rel(alone[1:], mixed[1:]),
    }


def row_losses_one(base, ids):
    import torch

    h = base.model(input_ids=ids).last_hidden_state[0]
    return [torch.nn.functional.cross_entropy(base.lm_head(h[:-1]).float(), ids[0, 1:]).item()]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y over x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def longest_rows(v: dict, usable_gb: float, host_gb: float) -> dict:
    """The longest single row each path trains at batch 1, from the probes: peak GPU memory is linear in the
    row length L (flash attention keeps no L x L matrix), so max L = (usable - intercept) / slope. With
    offloading the host holds `c` GB per token and layer; offloading m of the layers moves m x c from GPU to
    host, and the best m is the one where neither side runs out first."""
    modes = {
        "plain": "plain_long_",
        "checkpointing": "project_long_",
        "tiled_mlp": "project_long_tiled_",
        "tiled_mlp_offload_all": "project_long_tiled_offload32_",
    }
    out, fits = {"usable_gpu_gb": usable_gb, "host_usable_gb": host_gb}, {}
    for mode, prefix in modes.items():
        pts = [
            (r["L"], r["peak_gb"])
            for n, r in v.items()
            if n.startswith(prefix) and n[len(prefix) :].isdigit() and r.get("peak_gb")
        ]
        if len(pts) >= 2:
            slope, icpt = fit_line(pts)
            fits[mode] = (slope, icpt)
            out[mode] = {
                "gb_per_1k_tokens": round(slope * 1e3, 4),
                "intercept_gb": round(icpt, 2),
                "measured_lengths": sorted(x for x, _ in pts),
                "max_tokens_gpu_only": int((usable_gb - icpt) / slope),
            }
    if "tiled_mlp" in fits and "tiled_mlp_offload_all" in fits:
        a_t, b_t = fits["tiled_mlp"]
        a_o, _ = fits["tiled_mlp_offload_all"]
        layers = LLAMA3_8B["num_hidden_layers"]
        c = (a_t - a_o) / layers  # GB per token a layer's offload frees on the GPU (measured)
        # GB per token a layer's offload takes on the host: its bf16 input, 2 bytes x hidden (the 16k probe's
        # pinned-memory peak is exactly that; later probes' peaks also count the previous probe's blocks)
        c_host = 2 * LLAMA3_8B["hidden_size"] / 1e9
        best = max(
            (
                (m, min((usable_gb - b_t) / (a_t - m * c), host_gb / (m * c_host) if m else float("inf")))
                for m in range(layers + 1)
            ),
            key=lambda x: x[1],
        )
        out["partial_offload"] = {
            "gpu_gb_freed_per_1k_tokens_per_layer": round(c * 1e3, 5),
            "host_gb_per_1k_tokens_per_layer": round(c_host * 1e3, 5),
            "best_offloaded_layers": best[0],
            "max_tokens": int(best[1]),
        }
    plain = out.get("plain", {}).get("max_tokens_gpu_only")
    if plain:
        for mode in ("checkpointing", "tiled_mlp"):
            if mode in out:
                out[mode]["ratio_to_plain"] = round(out[mode]["max_tokens_gpu_only"] / plain, 2)
        if "partial_offload" in out:
            out["partial_offload"]["ratio_to_plain"] = round(out["partial_offload"]["max_tokens"] / plain, 2)
    return out


def summarize() -> None:
    v = RESULTS.get("variants", {})
    if any(n.startswith(("plain_long_", "project_long_")) for n in v):
        RESULTS["longest_rows"] = longest_rows(
            v,
            usable_gb=RESULTS.get("gpu_total_gb", 150.0) - 2.0,
            host_gb=0.9 * RESULTS.get("host_mem_available_gb", 0.0),
        )

    def tps(n):
        return v.get(n, {}).get("real_tokens_per_s")

    plain = tps("plain_alpaca_b2x4")
    s = {}
    if plain:
        cands = [
            n
            for n in ("project_alpaca_same_b8x1_gc", "project_alpaca_same_b4x2_gc")
            if tps(n) and v[n].get("peak_gb", 1e9) <= v["plain_alpaca_b2x4"].get("peak_gb", 0)
        ]
        s["same_batch_variant"] = max(cands, key=tps) if cands else "project_alpaca_same_b8x1_gc"
        same = tps(s["same_batch_variant"])
        s["ratio_same_batch"] = round(same / plain, 2) if same else None
        s["ratio_same_batch_nogc"] = (
            round(tps("project_alpaca_same_b8x1_nogc") / plain, 2) if tps("project_alpaca_same_b8x1_nogc") else None
        )
        packs = {n: tps(n) for n in v if n.startswith("project_alpaca_pack") and tps(n)}
        if packs:
            best = max(packs, key=packs.get)
            s["default_variant"] = best
            s["ratio_default"] = round(packs[best] / plain, 2)
        la = (v.get("plain_alpaca_b2x4", {}).get("first_losses") or [None])[0]
        lb = (v.get(s["same_batch_variant"], {}).get("first_losses") or [None])[0]
        if la and lb:
            s["first_step_loss_plain"], s["first_step_loss_project"] = la, lb
            s["first_step_loss_rel_diff"] = round(abs(la - lb) / la, 5)
    y = tps("project_yaml_default")
    if y:
        s["yaml_rows_per_step"] = v["project_yaml_default"].get("rows_per_step")
        if plain:
            s["ratio_yaml_default_vs_plain_b2x4"] = round(y / plain, 2)
        if tps("plain_trl_yaml_b8x2_gc"):
            s["ratio_yaml_default_vs_plain_trl_b8x2"] = round(y / tps("plain_trl_yaml_b8x2_gc"), 2)
        if tps("unsloth_yaml_b8x2"):
            s["ratio_yaml_default_vs_unsloth_b8x2"] = round(y / tps("unsloth_yaml_b8x2"), 2)
        s["ablation_tokens_per_s"] = {
            n.removeprefix("project_yaml_"): tps(n) for n in v if n.startswith("project_yaml_")
        }
    cal = liger_pairs(v, RESULTS.get("date_utc") or time.strftime("%Y-%m-%d"))
    if cal:
        s["kernel_calibration"] = {"gpu": RESULTS.get("device"), "liger": cal}
    RESULTS["summary"] = s
    RESULTS.save()
    print("\nvariant                              tok/s    step_s  peak_GB   MFU")
    for n, r in v.items():
        print(
            f"{n:34s} {r.get('real_tokens_per_s', '-')!s:>8} {r.get('step_s', '-')!s:>8} "
            f"{r.get('peak_gb', '-')!s:>8} {r.get('mfu', '-')!s:>6}  {r.get('error', '')}"
        )
    print(json.dumps(s))


def liger_child(a, model_dir: Path, side: str) -> dict:
    """One side of the liger comparison measured by a fresh process of this script (see liger_ab)."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="tt-liger-"))
    out = work / "r.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--only", f"liger_{side}"]
    cmd += ["--model-dir", str(model_dir), "--tokenizer", a.tokenizer, "--data", a.data, "--config", a.config]
    cmd += ["--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--tiny"] if a.tiny else [])
    cmd += ["--rows", str(a.rows)] if a.rows else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    try:
        r = json.loads(out.read_text())["variants"][f"project_yaml_liger_{side}"]
    except (OSError, ValueError, KeyError):
        raise RuntimeError(f"liger_{side} child exited {proc.returncode}: {proc.stderr[-2000:]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "error" in r:
        raise RuntimeError(f"liger_{side} child: {r['error']}")
    return dict(r, process="fresh")


def liger_pairs(v: dict, when: str) -> list[dict]:
    """Rows for the kernel table: each variant measured with liger on beside its twin with it off, same run."""
    pairs = [(f"project_yaml_liger_on_r{i}", f"project_yaml_liger_off_r{i}") for i in range(100)]
    if v.get("project_yaml_default", {}).get("switches", {}).get("use_liger_kernel"):
        pairs.append(("project_yaml_default", "project_yaml_no_liger"))
    out = []
    for on, off in pairs:
        a, b = v.get(on, {}), v.get(off, {})
        # an "off" run whose norms still ran LigerRMSNorm (liger applied earlier in its process) is no baseline
        if a.get("real_tokens_per_s") and b.get("real_tokens_per_s") and not b.get("liger_active", True):
            out.append(
                {
                    "tokens_per_micro_batch": a["switches"]["tokens_per_micro_batch"],
                    "on_tokens_per_s": a["real_tokens_per_s"],
                    "off_tokens_per_s": b["real_tokens_per_s"],
                    "source": f"{on} vs {off}",
                    "measured": when,
                }
            )
    return out


def calibrate(files: list[str]) -> dict:
    """Merge the liger rows of result files into ftkit's kernel table (benchmarks/results/kernel_table.json)."""
    from ftkit import kernel_table

    table = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        if d.get("tiny") or not str(d.get("device", "")).startswith("NVIDIA"):
            raise SystemExit(f"{f}: not a GPU run ({d.get('device')}); the table holds GPU measurements only")
        rows = liger_pairs(d.get("variants", {}), str(d.get("date_utc", "?")))
        for r in rows:
            r["source"] = f"{Path(f).name}: {r['source']}"
        table = kernel_table.record(d["device"], "liger", rows)
        print(f"{f}: {len(rows)} liger rows for {d['device']}")
    return table


def host_pinned_peak(reset: bool = False) -> float | None:
    """Peak bytes of pinned host memory torch allocated (the offloaded checkpoints) since the last reset."""
    import torch

    try:
        if reset:
            torch.cuda.memory.reset_peak_host_memory_stats()
        return float(torch.cuda.memory.host_memory_stats()["allocated_bytes.peak"])
    except Exception:  # a torch without host allocator statistics
        return None


# -- CPU: the demo config -------------------------------------------------------------------------------
def cpu_main(a) -> None:
    import torch

    from ftkit import data as data_stage
    from ftkit import train
    from ftkit.config import load_config
    from ftkit.models import load_tokenizer, resolve_model

    if not a.tiny:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    RESULTS["device"] = f"cpu ({os.cpu_count()} cores)"
    RESULTS["versions"] = versions()
    over = []
    if a.tiny:  # the demo config around the tiny model
        build_model(Path(a.model_dir), Path(a.tokenizer), tiny=True)
        over = [f"model.name_or_path={a.model_dir}", "model.gguf_source=null", f"data.path={a.data}"]
        from transformers import AutoTokenizer

        if not AutoTokenizer.from_pretrained(a.model_dir).chat_template:  # a base model's tokenizer
            over.append("data.prompt_template=alpaca")
        RESULTS["tiny"] = True
    cfg = load_config("configs/demo.yaml", over)
    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    prep = data_stage.prepare(cfg, tok)
    rows, lengths = prep.train.rows, prep.train.lengths
    if a.rows:
        rows, lengths = rows[: a.rows], lengths[: a.rows]
    RESULTS["data"] = {"source": cfg.data.path, "rows": len(rows), "mean_tokens": round(sum(lengths) / len(lengths), 1)}
    base = train.load_quantized_base(cfg, source, offline, "cpu")
    W, S = a.warmup, a.steps
    tiny_over = over
    bs, ga = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps

    def plain(base):
        tr = plain_trainer(base, tok, rows, W + S, "cpu", bs, ga, cfg.data.max_length)
        return run_trainer(tr, W, "cpu")

    def project(base, over):
        tr, info = project_trainer(base, tok, rows, lengths, W + S, "cpu", [*tiny_over, *over], "configs/demo.yaml")
        r = run_trainer(tr, W, "cpu")
        r["switches"] = {k: v for k, v in info.items() if k not in ("estimate", "estimate_largest", "changes")}
        return r

    # The paths alternate (plain, default, padding-free, plain, ...) so that a slow spell of a shared CPU
    # does not land on one path only; the summary compares medians.
    paths = {
        "plain_demo": (plain,),
        "project_demo_default": (project, []),
        "project_demo_padding_free": (project, ["train.padding_free=true"]),
    }
    for rep in range(a.repeat):
        for name, (fn, *args) in paths.items():
            variant(name if a.repeat == 1 else f"{name}_r{rep}", base, fn, *args)
    v = RESULTS["variants"]

    def median_tps(name):
        xs = sorted(r["real_tokens_per_s"] for n, r in v.items() if n.startswith(name) and r.get("real_tokens_per_s"))
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2 if xs else None

    med = {name: median_tps(name) for name in paths}
    p = med["plain_demo"]
    RESULTS["summary"] = {
        "median_tokens_per_s": med,
        "repeats": a.repeat,
        "ratio_to_plain": {n: round(x / p, 3) for n, x in med.items() if p and x},
    }
    RESULTS.save()
    print(json.dumps(RESULTS["summary"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--out", required=True)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--cpu", action="store_true", help="the CPU demo comparison")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run on the CPU: a 2-layer model (built in a temporary folder unless --model-dir), the shipped "
        "demo rows, small packs and probes, one timed step (defaults: "
        + ", ".join(f"{k}={v[1]}" for k, v in DEFAULTS.items())
        + "); with --cpu: the demo comparison on that model",
    )
    p.add_argument("--config", default="configs/llama3_alpaca_h200.yaml")
    p.add_argument("--model-dir", help=f"default {DEFAULTS['model_dir'][0]} (built there once)")
    p.add_argument("--tokenizer", default=".bench/tokenizer")
    p.add_argument("--data", help=f"default {DEFAULTS['data'][0]}")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--rows", type=int, help="train on the first N rows only (default: all)")
    p.add_argument("--fixed-rows", type=int)
    p.add_argument("--fixed-len", type=int, help="tokens of each fixed row (default 2048)")
    p.add_argument(
        "--repeat", type=int, default=1, help="--cpu: run the paths this many times, interleaved; liger_ab: pairs"
    )
    p.add_argument("--pack-tokens", type=ints)
    p.add_argument("--throughput-pack", type=int, help="pack_tokens of project_throughput (default 16384)")
    p.add_argument("--plain-probe", type=ints)
    p.add_argument("--project-probe", type=ints)
    p.add_argument("--offload-probe", type=ints)
    p.add_argument("--auto-probe", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    p.add_argument("--ablations", default="", help="comma list of project_yaml ablations (default: all)")
    p.add_argument(
        "--only",
        default="",
        help="comma list of groups: plain_alpaca,plain_yaml,project_yaml,"
        "project_throughput,plain_fixed,plain_long,unsloth_yaml,liger_ab (liger_on/liger_off: one side),"
        "project_same,project_default,project_fixed,project_long,project_long_tiled,project_long_offload,"
        "project_long_auto,contamination",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        help="merge the variants of earlier result files (later ones win) and write the summary to --out",
    )
    p.add_argument("--exclude", default="", help="with --summarize: comma list of variants to leave out")
    p.add_argument(
        "--calibrate",
        nargs="+",
        metavar="JSON",
        help="add the liger on/off pairs of GPU result files to the plan's kernel table "
        "(benchmarks/results/kernel_table.json, read by ftkit/kernel_table.py)",
    )
    p.add_argument("--unsloth-child", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.unsloth_child:
        unsloth_child(a.unsloth_child)
        return
    if a.calibrate:
        Path(a.out).write_text(json.dumps(calibrate(a.calibrate), indent=2) + "\n")
        return
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, v[1] if a.tiny else v[0])
    RESULTS.out = Path(a.out).resolve()
    os.chdir(ROOT)
    if a.summarize:
        drop = set(filter(None, a.exclude.split(",")))
        for f in a.summarize:
            d = json.loads(Path(f).read_text())
            for k, v in d.items():
                if k == "variants":
                    RESULTS.setdefault("variants", {}).update({n: r for n, r in v.items() if n not in drop})
                elif k not in ("summary", "longest_rows"):
                    RESULTS[k] = v
        RESULTS["merged_from"] = [Path(f).name for f in a.summarize]
        RESULTS["excluded"] = sorted(drop)
        summarize()
        print(json.dumps(RESULTS.get("longest_rows"), indent=1))
        return
    if a.tiny:
        import torch

        # A 2-layer model's ops are too small to share between threads: on the shared 2-core machine two
        # threads ran the smoke run ~3x slower than one.
        torch.set_num_threads(1)
    tmp = None
    if a.model_dir is None:  # --tiny: a model of its own, removed at the end
        tmp = tempfile.mkdtemp(prefix="tt-tiny-")
        a.model_dir = str(Path(tmp) / "model")
    try:
        (cpu_main if a.cpu else gpu_main)(a)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
