"""QLoRA fine-tuning: 4-bit base + LoRA adapters, trained with TRL's SFTTrainer on Alpaca rows or conversations,
or (train.method=dpo|kto|orpo|simpo) with TRL's preference trainers on chosen/rejected pairs, or
(train.method=grpo) with TRL's GRPOTrainer: completions sampled for the rows' prompts, scored by train.rewards.

Reads:  the YAML config; `model.name_or_path` (hub id or local folder); `data.path`.
Writes: a new run directory, <paths.output_dir>/:
          config.yaml (what you asked: YAML + overrides), plan.json (what runs: every value decided from the
          config, the data and the hardware; the values that differ from the YAML are logged with reasons),
          manifest.json (versions, git commit, data hash, seed),
          prompt_template.json, dataset_report.json, eval_rows.jsonl (held-out rows),
          checkpoints/checkpoint-N/ (resumable), train_log.jsonl (loss, lr, tokens per step),
          adapter/ (PEFT adapter, safetensors, + tokenizer; written atomically), run_summary.json,
          completions.jsonl (GRPO: each logging step's sampled completions with their rewards),
        then points <paths.latest> at the run, so merge_adapter.py and inference.py find it.

Run:
    python finetune.py --config configs/demo.yaml
    python finetune.py --config configs/llama3_alpaca.yaml train.max_steps=500
    python finetune.py --config configs/demo.yaml --resume          # continue a killed run
    python finetune.py --config configs/demo_dpo.yaml               # DPO on preference pairs (train.method)
    python finetune.py --config configs/demo_grpo.yaml              # GRPO: rewards from the rows' answers
    python finetune.py --config configs/demo_dpo.yaml model.adapter=runs/demo   # DPO on from an SFT run's adapter
    accelerate launch --config_file configs/accelerate/ddp.yaml finetune.py --config ...
An existing run directory is never overwritten unless --overwrite is given.

Interruptions: a checkpoint (adapter, optimizer, scheduler, RNG states, data position) is saved every
train.save_steps. After a kill, --resume (or train.resume: auto) continues from the newest complete
checkpoint, skipping any cut off mid-write, and train_log.jsonl is cut back to that step so no step is
logged twice. Ctrl+C (SIGINT) or SIGTERM finishes the step in flight, saves a checkpoint, prints the resume
command and exits with 128 + the signal number (130 for Ctrl+C): the run is not finished, so scripts that
chain stages stop, and nothing is lost. A second Ctrl+C aborts at once.
Under `accelerate launch` the terminal's Ctrl+C reaches the launcher (torchrun's agent), which forwards it to
the workers: they save as above, the launcher then exits 1 (torchrun's SignalException) and a second Ctrl+C
reaches the workers as SIGTERM and aborts. The launcher SIGKILLs workers still running
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) after the first signal: raise it when one step and a
checkpoint save take longer.
Exit codes: 0 done, 2 bad input (one line on stderr), 130/143 interrupted with a checkpoint saved.
"""

from __future__ import annotations

import time

from ftkit import rewards, train
from ftkit.cli import build_parser, log, parse_args, run_main
from ftkit.config import Config
from ftkit.distributed import check_distributed, dist_info, fsdp_enabled, is_main, setup
from ftkit.errors import UserError
from ftkit.models import causal_lm_config, load_tokenizer, pick_device, resolve_model, start_adapter
from ftkit.pairs import load_clean_split, prepare, print_report
from ftkit.paths import load_run_config
from ftkit.plan import detect_hardware, make_plan, reference_hardware


def main(cfg: Config, overwrite: bool = False, resume: bool = False) -> dict:
    # 1. Everything that can fail on bad input fails first, before the run directory is touched: the run-dir
    #    rules, the data (in about a second, before torch loads), the model's structure and LoRA targets (no
    #    weights), the plan (a plan that cannot fit the GPU stops here), the disk (for the planned steps' saves)
    #    and TRL's arguments.
    run, resume = train.open_run(cfg, overwrite, resume)
    loaded = load_clean_split(cfg.data, cfg.train.method)
    hw = setup(cfg)
    source, offline = resolve_model(cfg.model)
    skeleton, tok = train.inspect_model(cfg, source, offline)
    prep = prepare(cfg, tok, loaded)
    if is_main():
        print_report(prep.report)
    reward_funcs = train.load_rewards(cfg, run, prep, tok)  # GRPO: a user's reward file is loaded and tried here
    plan = make_plan(cfg, hw, prep.train.lengths, skeleton.config, eval_rows=len(prep.eval.rows))
    train.check_run_inputs(cfg, run, plan, skeleton, len(prep.train.rows), len(prep.eval.rows))
    if is_main():
        log.info("%s", plan.describe())
    args = train.trainer_args(cfg, run, plan)
    del skeleton
    # 2. The model: 4-bit base, LoRA, the planned switches.
    model, params = train.build_model(cfg, plan, source, offline)
    # 3. The run directory, locked while this run writes it: config.yaml (asked), plan.json (runs), manifest,
    #    template, report, held-out rows. Leaving the block settles it (a replaced run comes back if this one
    #    stopped before its first checkpoint) and releases the lock.
    with train.start_run(run, overwrite, resume) as lease:
        train.write_run_start(cfg, run, plan, prep, resume)
        # 4. Train; Ctrl+C / SIGTERM saves a checkpoint and stops.
        stop = train.StopRequest()
        trainer = train.make_trainer(cfg, run, plan, model, tok, prep, args, stop, lease, reward_funcs)
        ckpt = train.resume_point(run) if resume else None
        t0 = time.time()
        with stop:
            result = trainer.train(resume_from_checkpoint=ckpt)
        if stop.hit:
            return train.interrupted(run, plan, trainer, stop)
        # 5. The adapter, the summary, and the latest-run pointer, last.
        return train.finish(cfg, run, plan, trainer, result, params, time.time() - t0, ckpt)


def dry_run(cfg: Config) -> dict:
    """The training plan with the predicted peak GPU memory and tokens/s of one step on the detected GPU (the
    calibrated reference GPU when none is visible; ftkit/estimate.py). Loads no weights, writes nothing."""
    train.check_options(cfg)
    if cfg.train.method == "grpo":  # the reward files exist; none is run here
        rewards.check_files(cfg.train)
    device = pick_device(cfg.train.device)
    check_distributed(
        cfg, device
    )  # the launch's checks too (FSDP settings, GPUs without a launcher), as setup() runs them
    source, offline = resolve_model(cfg.model)
    start_adapter(cfg)  # the adapter training would start from: checked as the run checks it
    mconf = causal_lm_config(cfg, source, offline)
    lengths, note, n_eval = [], "", None
    try:
        prep = prepare(cfg, load_tokenizer(cfg, source, offline))
        lengths, n_eval = prep.train.lengths, len(prep.eval.rows)
    except UserError as e:
        note = f" (data not readable: {e}; rows assumed {cfg.data.max_length // 2} tokens)"
    if n_eval is not None:
        train.check_eval_settings(cfg, n_eval)
    world = dist_info()["world_size"]
    hw = (
        detect_hardware(device, world, fsdp_enabled())
        if device == "cuda"
        else reference_hardware(world, fsdp_enabled())
    )
    plan = make_plan(cfg, hw, lengths, mconf, eval_rows=n_eval, strict=False)
    where = plan.gpu if device == "cuda" else f"{plan.gpu} (no GPU detected here; the calibrated reference)"
    print(f"dry run: {cfg.model.name_or_path} on {where}{note}")
    print(plan.prediction())
    return {"exit_code": 0, "dry_run": plan.to_json()}


def cli(argv) -> int:
    p = build_parser(__doc__, config_required=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run (kept aside until the new run's first checkpoint)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the training plan with its predicted peak GPU memory and tokens/s, then stop",
    )
    a = parse_args(p, argv)
    cfg = load_run_config(a.config, a.overrides)
    if a.dry_run:
        return dry_run(cfg)["exit_code"]
    out = main(cfg, overwrite=a.overwrite, resume=a.resume)
    return out.get("exit_code", 0)


if __name__ == "__main__":
    run_main(cli)
