"""GRPO throughput: plain TRL GRPOTrainer against finetune.py's GRPO path (train.method=grpo), side by side in one
run, on the same 4-bit base, the same prompts, the same reward and the same batch: completions a second (sampling
included) and training steps a second.

GPU (issue 29's benchmark; benchmarks/README.md has the command that produced the results file):
    python benchmarks/grpo_throughput.py --out benchmarks/results/h200_grpo.json \
        --tokenizer .bench/tokenizer --data .bench/alpaca_en_1k.json
  builds Llama-3-8B's architecture with random weights once (train_throughput.py's builder), loads it in 4-bit NF4
  + double quant through finetune.py's loader, takes the Alpaca rows' prompts, and trains with 8 completions for
  each of 2 prompts a step (16 completions), each up to --completion tokens, rewarded by their length (random
  weights rarely stop, so every completion runs to the limit in both variants alike):
    (a) plain: TRL GRPOTrainer around a PEFT config, GRPOConfig's defaults (gradient checkpointing on);
    (b) project: configs/llama3_alpaca.yaml with train.method=grpo through ftkit (make_plan, apply_lora, the speed
        switches, trainer_args, build_trainer), the same batch.
  Each variant's steps are split into sampling and the rest (the log-probabilities, loss and update) by timing the
  trainer's completion sampling (patches.time_calls).
Smoke run (tests/test_benchmarks.py): the same two variants on the CPU, on a 2-layer model of Llama-3-8B's
architecture built in a temporary folder, prompts from the shipped demo rows, one timed step each:
    python benchmarks/grpo_throughput.py --tiny --tokenizer .cache/models/SmolLM2-135M-Instruct --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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

CONFIG = "configs/llama3_alpaca.yaml"
# --tiny's defaults beside the GPU benchmark's
DEFAULTS = {
    "model_dir": ("/tmp/llama3-8b-random", None),
    "data": (".bench/alpaca_en_1k.json", "data/demo_tasks.jsonl"),
    "rows": (64, 16),
    "completion": (256, 8),
    "warmup": (1, 1),
    "steps": (3, 1),
}
GENERATIONS, PROMPTS_A_STEP = 8, 2
# --sampling NAME...: GRPOConfig's other sampling paths in transformers, each as one more project variant
SAMPLING = {
    "static_cache": {"cache_implementation": "static"},
    "continuous_batching": {"use_transformers_continuous_batching": True},
}


def length_reward(completion_ids, **kw) -> list[float]:
    """The plain variant's reward: what the project's built-in `length` costs, a pass over the completions."""
    return [float(len(c)) for c in completion_ids]


def timed(trainer, warmup: int, device: str) -> dict:
    """run_trainer's step times, with completions counted as the rows a step and the sampling time split out."""
    from ftkit import patches

    spent: dict = {}
    patches.time_calls(trainer, "_generate", spent)
    res = run_trainer(trainer, warmup, device, count=lambda f: 0)
    for k in ("real_tokens_per_s", "real_tokens_per_step"):  # no rows of tokens here: completions are counted
        del res[k]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    steps = len(logs)
    completions = res["rows_per_step"]
    sample_s = spent["_generate"][warmup:]
    return {
        **res,
        "completions_per_step": completions,
        "completions_per_s": round(completions / res["step_s"], 2),
        "steps_per_s": round(1 / res["step_s"], 4),
        "mean_completion_tokens": round(sum(h["completions/mean_length"] for h in logs) / steps, 1),
        "completion_tokens_per_s": round(
            completions
            * sum(h["completions/mean_length"] for h in logs[warmup:])
            / max(1, steps - warmup)
            / res["step_s"]
        ),
        "sampling_s_per_step": round(sum(sample_s) / max(1, len(sample_s)), 3),
        "sampling_share": round(sum(sample_s) / max(1, len(sample_s)) / res["step_s"], 3),
    }


def plain_grpo(base, tok, rows, steps: int, warmup: int, device: str, completion: int):
    """(a) The plain recipe: TRL's GRPOTrainer defaults around a PEFT config."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    kw = plain_args(steps, device, GENERATIONS * PROMPTS_A_STEP, 1, 0)
    del kw["max_length"]  # GRPOConfig has max_completion_length instead
    args = GRPOConfig(**kw, num_generations=GENERATIONS, max_completion_length=completion)
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=plain_lora(),
    )
    return timed(trainer, warmup, device)


def project_grpo(base, tok, cfg, prep, warmup: int, device: str, sampling: dict | None = None):
    """(b) finetune.py's path for train.method=grpo: the plan, apply_lora, the speed switches, trainer_args (with
    --sampling's GRPOConfig settings on top), the rewards (the built-in `length`) and build_trainer."""
    from ftkit import rewards

    funcs = rewards.load(cfg.train, prep.train.rows, tok)
    trainer = method_trainer(base, tok, cfg, prep, prep.train.lengths, device, sampling, funcs)
    res = timed(trainer, warmup, device)
    keys = ("rows_per_micro_batch", "gradient_accumulation_steps", "gradient_checkpointing", "generator")
    return {**res, "plan": {k: RESULTS["project_plan"][k] for k in keys}}


def bench(a) -> None:
    import torch

    from ftkit import rl_rows, train
    from ftkit.config import load_config
    from ftkit.models import load_tokenizer, resolve_model

    device = "cpu" if a.tiny else "cuda"
    model_dir = Path(a.model_dir)
    build_model(model_dir, Path(a.tokenizer), a.tiny)
    steps = a.warmup + a.steps
    cfg = load_config(
        CONFIG,
        [
            f"model.name_or_path={model_dir}",
            f"data.path={a.data}",
            "data.eval_size=0",
            "train.method=grpo",
            f"train.num_generations={GENERATIONS}",
            f"train.per_device_train_batch_size={GENERATIONS * PROMPTS_A_STEP}",
            "train.gradient_accumulation_steps=1",
            f"train.max_completion_length={a.completion}",
            "train.rewards=[length]",
            f"train.max_steps={steps}",
            "train.logging_steps=1",
            "train.save_steps=100000",
            "train.report_to=none",
            "lora.lora_dropout=0.0",
            "train.eval_steps=null",
        ],
    )
    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    prep = rl_rows.prepare(cfg, tok)
    prep.train.rows[:] = prep.train.rows[: a.rows]
    prep.train.lengths[:] = prep.train.lengths[: a.rows]
    RESULTS.update(
        device=torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        tiny=a.tiny,
        config=CONFIG,
        data={
            "source": a.data,
            "prompts": len(prep.train.rows),
            "mean_prompt_tokens": prep.report["mean_prompt_tokens"],
        },
        batch={"prompts_a_step": PROMPTS_A_STEP, "completions_a_prompt": GENERATIONS, "max_completion": a.completion},
    )
    RESULTS["versions"] = versions()
    base = train.load_quantized_base(cfg, source, offline, device)
    rows = prep.train.rows
    plain = variant("plain_grpo", base, plain_grpo, tok, rows, steps, a.warmup, device, a.completion)
    proj = variant("project_grpo", base, project_grpo, tok, cfg, prep, a.warmup, device)
    for name in a.sampling:
        variant(f"project_grpo_{name}", base, project_grpo, tok, cfg, prep, a.warmup, device, SAMPLING[name])
    if plain and proj:
        RESULTS["summary"] = {
            "completions_per_s": {"plain": plain["completions_per_s"], "project": proj["completions_per_s"]},
            "ratio_project_vs_plain": round(proj["completions_per_s"] / plain["completions_per_s"], 2),
            "sampling_share": {"plain": plain["sampling_share"], "project": proj["sampling_share"]},
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
    p.add_argument("--data", help=f"Alpaca rows whose prompts are sampled from (default {DEFAULTS['data'][0]})")
    p.add_argument("--rows", type=int, help="the first N prompts only (default 64; --tiny: 16)")
    p.add_argument("--completion", type=int, help="max_completion_length (default 256; --tiny: 8)")
    p.add_argument("--sampling", nargs="*", default=[], choices=sorted(SAMPLING), help="more project variants")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    run_side_by_side(p.parse_args(argv), DEFAULTS, bench, RESULTS, ROOT, "gt-tiny-")


if __name__ == "__main__":
    main()
