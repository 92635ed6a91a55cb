"""QLoRA fine-tuning: 4-bit base + LoRA adapters, trained with TRL's SFTTrainer on Alpaca rows.

Reads:  the YAML config; `model.name_or_path` (hub id or local folder); `data.path`.
Writes: a new run directory, <paths.output_dir>/:
          config.yaml (resolved), manifest.json (versions, git commit, data hash, seed),
          prompt_template.json, dataset_report.json, eval_rows.jsonl (held-out rows),
          checkpoints/checkpoint-N/ (resumable), train_log.jsonl (loss, lr, tokens per step),
          adapter/ (PEFT adapter, safetensors, + tokenizer; written atomically), run_summary.json,
        then points <paths.latest> at the run, so merge_adapter.py and inference.py find it.

Run:
    python finetune.py --config configs/demo.yaml
    python finetune.py --config configs/llama3_alpaca.yaml train.max_steps=500
    python finetune.py --config configs/demo.yaml --resume          # continue a killed run
    accelerate launch --config_file configs/accelerate/ddp.yaml finetune.py --config ...
An existing run directory is never overwritten unless --overwrite is given.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import shutil
import sys
import time
from pathlib import Path

from ftkit.config import Config, build_parser, load_config, parse_args
from ftkit.log import UserError, log, run_main
from ftkit.models import load_causal_lm, load_tokenizer, pick_device, resolve_model
from ftkit.paths import (RunDir, atomic_dir, atomic_write_json, atomic_write_text, check_free_space,
                         save_resolved_config, write_latest, write_manifest)

import dataset as data_stage
from quantization_utils import build_bnb_config, validate_target_modules

CHECKPOINT_FILES = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")


# -- distributed facts -----------------------------------------------------------------------------
def dist_info() -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"world_size": world, "rank": int(os.environ.get("RANK", "0")),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}


def is_main() -> bool:
    return dist_info()["rank"] == 0


def barrier() -> None:
    if dist_info()["world_size"] > 1:
        from accelerate import PartialState
        PartialState().wait_for_everyone()


# -- checkpoints -----------------------------------------------------------------------------------
def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints that hold every file a resume needs, oldest first; cut-off ones are skipped loudly."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for c in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                    if p.name.split("-")[-1].isdigit() else -1):
        missing = [f for f in CHECKPOINT_FILES if not (c / f).is_file()]
        try:
            json.loads((c / "trainer_state.json").read_text()) if not missing else None
        except (json.JSONDecodeError, OSError):
            missing.append("trainer_state.json (corrupt)")
        if missing:
            log.warning("skipping incomplete checkpoint %s (missing %s)", c, ", ".join(missing))
            continue
        out.append(c)
    return out


# -- model -----------------------------------------------------------------------------------------
def load_quantized_base(cfg: Config, source: str, offline: bool, device: str):
    """The frozen base, 4-bit (or 8-bit / full precision) on this process's device."""
    bnb = build_bnb_config(cfg.quant)
    # One whole copy per process on its own GPU: device_map="auto" would spread one model over all GPUs
    # and silently train on one of them under DDP.
    device_map = {"": dist_info()["local_rank"]} if device == "cuda" else {"": "cpu"}
    model = load_causal_lm(cfg, source, offline, quantization_config=bnb, device_map=device_map)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def apply_lora(cfg: Config, model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    targets = validate_target_modules(model, cfg.lora.target_modules)
    if cfg.quant.load_in_4bit or cfg.quant.load_in_8bit:
        # Casts norms to fp32 and enables input grads so checkpointing works through frozen 4-bit layers.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=targets, bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, trainable, total


# -- training loop hooks ---------------------------------------------------------------------------
def make_callbacks(run: RunDir, stop_flag: dict):
    from transformers import TrainerCallback

    class TrainLog(TrainerCallback):
        """train_log.jsonl: one line per logged step, appended so a resumed run continues the same file."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(time.time(), 2),
                   "tokens_seen": state.num_input_tokens_seen, **logs}
            with open(run.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class Interrupt(TrainerCallback):
        """Ctrl+C: finish the step in flight, save a checkpoint, stop."""

        def on_step_end(self, args, state, control, **kw):
            if stop_flag["hit"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    return [TrainLog(), Interrupt()]


def sft_config(cfg: Config, run: RunDir, device: str, n_eval: int):
    from trl import SFTConfig
    t = cfg.train
    do_eval = bool(t.eval_steps) and n_eval > 0
    return SFTConfig(
        output_dir=str(run.checkpoints),
        learning_rate=t.learning_rate, max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=t.optim, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if do_eval else "no",
        eval_steps=t.eval_steps if do_eval else None,
        load_best_model_at_end=t.load_best_model_at_end or bool(t.early_stopping_patience),
        metric_for_best_model="eval_loss" if do_eval else None, greater_is_better=False if do_eval else None,
        seed=t.seed, data_seed=t.seed, bf16=t.bf16, use_cpu=device == "cpu",
        max_length=cfg.data.max_length, packing=False, padding_free=t.padding_free,
        use_liger_kernel=t.use_liger_kernel, dataloader_num_workers=t.dataloader_num_workers,
        report_to=t.report_to, include_num_input_tokens_seen="non_padding",
        save_only_model=False, disable_tqdm=not is_main(),
        # The dataset arrives tokenized with labels; TRL must not re-template it.
        dataset_kwargs={"skip_prepare_dataset": False}, remove_unused_columns=True,
    )


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB (Linux)


def final_losses(history: list[dict]) -> tuple[float | None, float | None]:
    train = [h["loss"] for h in history if "loss" in h]
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    return (train[-1] if train else None), (ev[-1] if ev else None)


# -- the stage -------------------------------------------------------------------------------------
def preflight(cfg: Config, run: RunDir, overwrite: bool, resume: bool) -> None:
    if run.holds_run() and not (overwrite or resume):
        raise UserError(f"run directory '{run.root}' already holds a run; pass --resume to continue it, "
                        "--overwrite to replace it, or set paths.output_dir to a new folder")
    if resume and not run.config.is_file():
        raise UserError(f"--resume: '{run.root}' holds no run to resume; drop --resume to start one")


def main(cfg: Config, overwrite: bool = False, resume: bool = False) -> dict:
    import torch
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer
    from datasets import Dataset

    resume = resume or cfg.train.resume == "auto" and RunDir(Path(cfg.paths.output_dir)).config.is_file()
    run = RunDir(Path(cfg.paths.output_dir))
    info = dist_info()
    preflight(cfg, run, overwrite, resume)
    barrier()
    device = pick_device(cfg.train.device)
    if cfg.train.bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.bf16 is on but this GPU has no bf16; set train.bf16=false and "
                        "quant.bnb_4bit_compute_dtype=float16")
    set_seed(cfg.train.seed)

    # Everything that can fail on bad input fails here, before the run directory exists.
    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    prep = data_stage.prepare(cfg, tok)
    if is_main():
        data_stage.print_report(prep.report)
    check_free_space(run.root, 200 * 2**20, "checkpoints and the adapter")
    model = load_quantized_base(cfg, source, offline, device)
    model, trainable, total = apply_lora(cfg, model)
    eff_batch = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * info["world_size"]
    log.info("device %s, world size %d, per-device batch %d x accumulation %d = global batch %d",
             device, info["world_size"], cfg.train.per_device_train_batch_size,
             cfg.train.gradient_accumulation_steps, eff_batch)

    if is_main():
        if run.root.exists() and overwrite and not resume:
            log.warning("--overwrite: removing the previous run in %s", run.root)
            shutil.rmtree(run.root)
        run.root.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run.config)
        write_manifest(cfg, run, prep.data_hash, {"world_size": info["world_size"], "device": device})
        atomic_write_json(run.prompt_template, prep.template.to_json())
        atomic_write_json(run.dataset_report, prep.report)
        atomic_write_text(run.root / "eval_rows.jsonl", "".join(json.dumps(r) + "\n" for r in prep.eval_records))
        log.info("resolved config:\n%s", cfg.to_yaml())
    barrier()

    stop_flag = {"hit": False}
    callbacks = make_callbacks(run, stop_flag)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = SFTTrainer(model=model, args=sft_config(cfg, run, device, len(prep.eval.rows)),
                         train_dataset=Dataset.from_list(prep.train.rows),
                         eval_dataset=Dataset.from_list(prep.eval.rows) if prep.eval.rows else None,
                         processing_class=tok, callbacks=callbacks)

    ckpt = None
    if resume:
        done = complete_checkpoints(run.checkpoints)
        if done:
            ckpt = str(done[-1])
            log.info("resuming from %s", ckpt)
        else:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.checkpoints)

    def on_sigint(signum, frame):
        if stop_flag["hit"]:  # a second Ctrl+C means now
            raise KeyboardInterrupt
        stop_flag["hit"] = True
        log.warning("Ctrl+C: saving a checkpoint after this step, then stopping (Ctrl+C again to abort)")
    signal.signal(signal.SIGINT, on_sigint)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.time() - t0
    state = trainer.state
    if stop_flag["hit"]:
        cmd = f"python finetune.py --config {run.config} --resume"
        print(f"stopped at step {state.global_step}; checkpoint saved in {run.checkpoints}. Resume with:\n  {cmd}")
        return {"interrupted": True, "step": state.global_step}

    train_loss, eval_loss = final_losses(state.log_history)
    evaluated_at = [h["step"] for h in state.log_history if "eval_loss" in h]
    if trainer.eval_dataset is not None and (not evaluated_at or evaluated_at[-1] != state.global_step):
        eval_loss = trainer.evaluate()["eval_loss"]
    tokens = int(state.num_input_tokens_seen or 0)
    summary = {
        "steps": state.global_step, "epochs": round(state.epoch or 0, 4), "wall_time_s": round(wall, 2),
        "trained_tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "peak_memory_gb": peak_memory_gb(device), "peak_memory_kind": "cuda_allocated" if device == "cuda" else "cpu_rss",
        "first_train_loss": next((h["loss"] for h in state.log_history if "loss" in h), None),
        "final_train_loss": train_loss, "final_eval_loss": eval_loss, "train_loss_mean": result.training_loss,
        "best_checkpoint": state.best_model_checkpoint, "best_metric": state.best_metric,
        "trainable_params": trainable, "total_params": total, "global_batch": eff_batch,
        "world_size": info["world_size"], "device": device, "resumed_from": ckpt,
    }
    if is_main():
        with atomic_dir(run.adapter) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        atomic_write_json(run.summary, summary)
        write_latest(cfg, run)
        log.info("adapter written to %s; summary: %s", run.adapter, json.dumps(summary))
    barrier()
    return summary


def cli(argv) -> None:
    p = build_parser(__doc__, config_required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    a = parse_args(p, argv)
    main(load_config(a.config, a.overrides), overwrite=a.overwrite, resume=a.resume)


if __name__ == "__main__":
    run_main(cli)
