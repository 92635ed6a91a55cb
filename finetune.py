"""QLoRA fine-tuning: 4-bit base + LoRA adapters, trained with TRL's SFTTrainer on Alpaca rows.

Reads:  the YAML config; `model.name_or_path` (hub id or local folder); `data.path`.
Writes: a new run directory, <paths.output_dir>/:
          config.yaml (what you asked: YAML + overrides), plan.json (what runs: every value decided from the
          config, the data and the hardware; the values that differ from the YAML are logged with reasons), manifest.json (versions, git commit, data hash, seed),
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

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

from ftkit import checkpoints as ftkit_checkpoints
from ftkit import runlock
from ftkit.config import Config, check_library_options, load_config
from ftkit.cli import build_parser, parse_args
from ftkit.cli import UserError, log, run_main
from ftkit.models import load_causal_lm, load_tokenizer, model_skeleton, pick_device, resolve_model, torch_dtype
from ftkit.plan import TrainPlan, detect_hardware, make_plan, reference_hardware
from ftkit.paths import (RunDir, atomic_dir, atomic_write_json, atomic_write_text, check_free_space,
                         check_latest_pointer, check_resume, save_resolved_config, write_latest, write_manifest)

import dataset as data_stage
from quantization_utils import build_bnb_config, linear_module_names, output_head_name, validate_target_modules

CHECKPOINT_FILES = ftkit_checkpoints.CHECKPOINT_FILES


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


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_distributed(cfg: Config, device: str) -> dict:
    """Refuse setups that would quietly train on fewer devices than the user has, and FSDP settings that
    cannot work; returns the distributed facts for the log and the run summary."""
    info = dict(dist_info(), fsdp=fsdp_enabled())
    if info["fsdp"]:
        q = cfg.quant
        if q.load_in_8bit:
            raise UserError("FSDP cannot shard 8-bit bitsandbytes weights; set quant.load_in_4bit=true "
                            "quant.load_in_8bit=false, or launch with configs/accelerate/ddp.yaml")
        if q.load_in_4bit and q.bnb_4bit_quant_storage != q.bnb_4bit_compute_dtype:
            raise UserError(f"FSDP shards the 4-bit weights only when they are stored in the compute dtype: set "
                            f"quant.bnb_4bit_quant_storage={q.bnb_4bit_compute_dtype} (now "
                            f"{q.bnb_4bit_quant_storage}, quant.bnb_4bit_compute_dtype={q.bnb_4bit_compute_dtype})")
        if q.load_in_4bit and cfg.model.dtype != q.bnb_4bit_quant_storage:
            raise UserError(f"FSDP needs one dtype for every weight: set model.dtype={q.bnb_4bit_quant_storage} "
                            f"to match quant.bnb_4bit_quant_storage (now model.dtype={cfg.model.dtype})")
        if "8bit" in cfg.train.optim:
            raise UserError(f"train.optim={cfg.train.optim} fails when FSDP saves a checkpoint (a known PEFT/bitsandbytes "
                            "limit); use train.optim=adamw_torch under FSDP")
        if device != "cuda":
            raise UserError("FSDP needs CUDA GPUs; on CPU launch with configs/accelerate/ddp.yaml instead")
        # Both recompute activations and transformers refuses the pair; the plan turns ours off (and says so).
        info["fsdp_activation_checkpointing"] = os.environ.get("FSDP_ACTIVATION_CHECKPOINTING",
                                                               "false").lower() == "true"
    if device == "cuda":
        import torch
        n = torch.cuda.device_count()
        if info["world_size"] == 1 and n > 1:
            raise UserError(f"{n} GPUs are visible but finetune.py runs as a single process, which trains on one GPU "
                            f"only; use all of them with `accelerate launch --config_file configs/accelerate/ddp.yaml "
                            f"--num_processes {n} finetune.py ...`, or choose one with CUDA_VISIBLE_DEVICES=0")
        if info["world_size"] > 1 and info["local_rank"] >= n:
            raise UserError(f"process LOCAL_RANK={info['local_rank']} has no GPU of its own (this machine shows {n}); "
                            f"launch at most {n} processes per machine (accelerate launch --num_processes)")
    if info["world_size"] > 1 or "LOCAL_RANK" in os.environ:
        # Start the process group now: model loading and the barriers below need it, and under FSDP
        # transformers loads the weights on local rank 0 only once it sees the group.
        from accelerate import PartialState
        PartialState(cpu=device == "cpu")
    return info


def allow_indexed_cpu_locations() -> None:
    """Resume under multi-process CPU training: the Trainer loads the optimizer state with
    map_location=args.device, which is "cpu:<rank>" there, and torch.load knows only "cpu". Teach it that
    "cpu:N" is the CPU. (On GPUs the location is "cuda:N", which torch knows.)"""
    import torch.serialization as ser

    def restore(obj, location):
        if location.startswith("cpu:"):
            return obj.cpu()
        return None
    if not getattr(ser, "_ftkit_cpu_index", False):
        taken = {entry[0] for entry in ser._package_registry}
        ser.register_package(next(n for n in range(90, 200) if n not in taken), lambda obj: None, restore)
        ser._ftkit_cpu_index = True


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_missing(c: Path) -> list[str]:
    """What a checkpoint lacks for a resume, or what of it is cut off (ftkit/checkpoints.py)."""
    return ftkit_checkpoints.checkpoint_missing(c)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints that hold every file a resume needs, oldest first; cut-off or corrupt ones are skipped
    loudly, so a resume falls back to the newest whole one."""
    return ftkit_checkpoints.complete_checkpoints(ckpt_dir)


def truncate_train_log(path: Path, step: int) -> int:
    """Keep the log rows up to the checkpoint a resume starts from; the resumed run logs the later steps
    again. Drops a line cut off by a kill and the end-of-run summary row of an interrupted run. Returns
    the rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(row, dict) or row.get("step", 0) > step or "train_loss" in row:
            dropped += 1
            continue
        kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return dropped


# -- model -----------------------------------------------------------------------------------------
def load_quantized_base(cfg: Config, source: str, offline: bool, device: str):
    """The frozen base, 4-bit (or 8-bit / full precision) on this process's device."""
    bnb = build_bnb_config(cfg.quant)
    # One whole copy per process on its own GPU: device_map="auto" would spread one model over all GPUs
    # and silently train on one of them under DDP.
    device_map = {"": dist_info()["local_rank"]} if device == "cuda" else {"": "cpu"}
    dtype = None
    if fsdp_enabled() and cfg.quant.load_in_4bit:
        # FSDP-QLoRA: every weight, the packed 4-bit ones included, in the storage dtype, so FSDP can flatten
        # and shard them together (check_distributed made storage == compute == model dtype).
        dtype = torch_dtype(cfg.quant.bnb_4bit_quant_storage)
    model = load_causal_lm(cfg, source, offline, quantization_config=bnb, device_map=device_map, dtype=dtype)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def apply_lora(cfg: Config, plan: TrainPlan, model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    targets = validate_target_modules(model, cfg.lora.target_modules)
    fsdp = fsdp_enabled()
    if (cfg.quant.load_in_4bit or cfg.quant.load_in_8bit) and not fsdp and plan.upcast_frozen_fp32:
        # Casts norms to fp32 and enables input grads so checkpointing works through frozen 4-bit layers.
        # Not under FSDP: it needs one dtype per wrapped unit; the Trainer enables checkpointing there.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif (cfg.quant.load_in_4bit or cfg.quant.load_in_8bit) and not fsdp:
        # The same without the float32 upcast (train.upcast_frozen_fp32): frozen weights stay in model.dtype.
        for p in model.parameters():
            p.requires_grad_(False)
        if plan.gradient_checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=targets, bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
                      task_type="CAUSAL_LM")
    # Under FSDP the LoRA weights stay in the base's dtype instead of fp32, for the same reason.
    model = get_peft_model(model, lcfg, autocast_adapter_dtype=not fsdp)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, trainable, total


def apply_speed_switches(plan: TrainPlan, model) -> None:
    """The model-side switches the plan decided: attention for padding-free rows, tiled MLP, offloading."""
    from ftkit import attention, patches
    if plan.attn_implementation == attention.VARLEN_ATTN:
        attention.use_varlen_attention(model)  # packed rows attend only within themselves, at their own length
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if base.config._attn_implementation != plan.attn_implementation:
            base.set_attn_implementation(plan.attn_implementation)
    if plan.tiled_mlp:
        log.info("tiled MLP: %d layers run their MLP in chunks of %d tokens", patches.use_tiled_mlp(model),
                 model.config.hidden_size)
    if plan.offload_layers:
        n = patches.offload_layer_inputs(model, plan.offload_layers)
        log.info("activation offloading: the checkpointed inputs of %d of %d layers go to CPU RAM (~%.1f GB for "
                 "the largest micro-batch)", n, len(patches.decoder_layers(model)),
                 plan.estimate_largest["host_offload_gb"])


# -- training loop hooks ---------------------------------------------------------------------------
def make_callbacks(run: RunDir, stop_flag: dict):
    from transformers import TrainerCallback

    class TrainLog(TrainerCallback):
        """train_log.jsonl: one line per logged step, appended so a resumed run continues the same file."""

        t0 = time.time()

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            # elapsed_s: since this process began training (evaluations included; eval rows carry
            # eval_runtime), so time-to-quality can be read off the log.
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(time.time(), 2),
                   "elapsed_s": round(time.time() - self.t0, 2),
                   "tokens_seen": state.num_input_tokens_seen, **logs}
            with open(run.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class Interrupt(TrainerCallback):
        """Ctrl+C: finish the step in flight, save a checkpoint, stop.

        Under several processes every rank must stop at the same step, or the others would wait forever
        in the next gradient all-reduce: the flag is max-reduced across ranks after each step.
        """

        def on_step_end(self, args, state, control, **kw):
            if dist_info()["world_size"] > 1:
                import torch
                import torch.distributed as tdist
                flag = torch.tensor([float(stop_flag["hit"] or 0)], device=args.device)  # the signal number
                tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
                stop_flag["hit"] = int(flag.item()) or stop_flag["hit"]
            if stop_flag["hit"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    class NoPickledArgs(TrainerCallback):
        """The Trainer pickles its arguments into every checkpoint (training_args.bin); a resume never reads
        it, and a pickle runs code when loaded. Checkpoints keep only what a resume loads: safetensors,
        JSON, and the optimizer/scheduler/RNG tensors, which the Trainer loads with weights_only=True."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)

    class FirstCheckpoint(TrainerCallback):
        """With --overwrite the replaced run is kept aside until the new run can be resumed; now it can."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                runlock.checkpoint_saved(run.root)

    class NonFinite(TrainerCallback):
        """Stop at the first inf/NaN in the loss, the gradient norm or the LoRA weights, before a save could
        keep it: a run that goes on trains nothing but NaN and would exit 0 with an unusable adapter. The
        weights are checked on each step that logs or saves (DefaultFlowCallback, called first, has decided
        that), and the error names the newest checkpoint saved before, which holds finite weights."""

        def _fail(self, state, what: str):
            from ftkit.checkpoints import complete_checkpoints as whole
            good = whole(run.checkpoints)
            keep = (f"the last good checkpoint is {good[-1]}; resume from it with a lower train.learning_rate "
                    f"(python finetune.py --config {run.config} --resume train.learning_rate=...)" if good else
                    "no checkpoint was saved before it; lower train.learning_rate (or train.max_grad_norm) and "
                    "start again")
            raise UserError(f"training diverged at step {state.global_step}: {what} is not finite (inf or NaN); "
                            f"{keep}")

        def on_log(self, args, state, control, logs=None, **kw):
            for k in ("loss", "grad_norm", "eval_loss"):
                v = (logs or {}).get(k)
                if isinstance(v, (int, float)) and not math.isfinite(v):
                    self._fail(state, f"the {k.replace('_', ' ')} ({v})")

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is None or not (control.should_log or control.should_save or control.should_training_stop):
                return
            from ftkit.models import first_nonfinite
            bad = first_nonfinite(model, trainable_only=True)
            if bad:
                self._fail(state, f"LoRA weight {bad}")

    return [TrainLog(), NonFinite(), Interrupt(), NoPickledArgs(), FirstCheckpoint()]


def log_first_batch(collator) -> None:
    """Log which rows each rank's first training batch holds (a short hash per row): under DDP the ranks
    must take different shards of the same global batch, and two runs with the same seed must start on the
    same rows. The collator keeps its class (as a subclass), so isinstance checks in TRL still hold."""
    base = type(collator)

    class FirstBatchLogged(base):
        def __call__(self, features, *args, **kwargs):
            if not getattr(self, "_first_logged", False):
                self._first_logged = True
                import zlib
                info = dist_info()
                rows = [f"{zlib.crc32(str(list(f['input_ids'])).encode()):08x}" for f in features]
                log.info("rank %d of %d: first batch rows %s", info["rank"], info["world_size"], ",".join(rows))
            return base.__call__(self, features, *args, **kwargs)

    collator.__class__ = FirstBatchLogged


def check_eval_settings(cfg: Config, n_eval: int) -> None:
    """Keeping the best checkpoint needs evaluations, and a checkpoint saved at every evaluated step."""
    t = cfg.train
    key = ("train.load_best_model_at_end" if t.load_best_model_at_end else
           "train.early_stopping_patience" if t.early_stopping_patience else None)
    if key is None or not t.eval_steps:
        return
    if n_eval == 0:
        raise UserError(f"{key} needs held-out rows to evaluate on, but data.eval_size leaves none; "
                        f"set data.eval_size above 0 or turn {key} off")
    if t.save_steps % t.eval_steps:
        fix = max(1, round(t.save_steps / t.eval_steps)) * t.eval_steps
        raise UserError(f"{key} keeps the checkpoint with the best eval loss, so train.save_steps ({t.save_steps}) "
                        f"must be a multiple of train.eval_steps ({t.eval_steps}); set train.save_steps={fix}")


def sft_config(cfg: Config, run: RunDir, plan: TrainPlan, n_eval: int):
    """TRL's arguments: the batch, learning rate and switches from the plan, everything else from the YAML."""
    from trl import SFTConfig
    t = cfg.train
    packing = plan.packing
    do_eval = bool(t.eval_steps) and n_eval > 0
    return SFTConfig(
        output_dir=str(run.checkpoints),
        learning_rate=plan.learning_rate, max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        # packed: one micro-batch is one packed row of train.pack_tokens tokens
        per_device_train_batch_size=plan.per_device_train_batch_size,
        per_device_eval_batch_size=1 if packing else t.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=t.optim, gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if do_eval else "no",
        eval_steps=t.eval_steps if do_eval else None,
        load_best_model_at_end=t.load_best_model_at_end or bool(t.early_stopping_patience),
        metric_for_best_model="eval_loss" if do_eval else None, greater_is_better=False if do_eval else None,
        seed=t.seed, data_seed=t.seed, bf16=t.bf16, use_cpu=plan.device == "cpu",
        # Rows arrive truncated to data.max_length; TRL refuses max_length with padding_free and no packing.
        max_length=t.pack_tokens if packing else (None if plan.padding_free else cfg.data.max_length),
        packing=packing, packing_strategy="bfd", padding_free=plan.padding_free,
        use_liger_kernel=plan.use_liger_kernel, dataloader_num_workers=t.dataloader_num_workers,
        report_to=t.report_to, include_num_input_tokens_seen="non_padding",
        save_only_model=False, disable_tqdm=not is_main(),
        # Every LoRA weight gets a gradient on every step; searching for unused ones costs a graph walk.
        ddp_find_unused_parameters=False if dist_info()["world_size"] > 1 else None,
        # The dataset arrives tokenized with labels; TRL must not re-template it.
        dataset_kwargs={"skip_prepare_dataset": False}, remove_unused_columns=True,
    )


def adapter_tensors(model, full_state: dict) -> dict:
    """The active adapter's LoRA tensors out of a full state dict, keyed as PEFT writes adapter files
    ("...q_proj.lora_A.weight": the adapter name dropped)."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    tag = f".{name}."
    return {k.replace(tag, "."): v.detach().contiguous() for k, v in full_state.items()
            if tag in k and ".lora_" in k}  # lora_A/B, lora_embedding_A/B, lora_magnitude_vector (DoRA)


def save_adapter(trainer, run: RunDir, n_lora: int) -> None:
    """The final adapter as a plain PEFT folder (adapter_config.json + adapter_model.safetensors + tokenizer),
    written by rank 0 into a temporary folder and renamed into place.

    Under FSDP the LoRA weights are sharded: every rank joins the gather of the full state dict of the FSDP
    root, then rank 0 writes the LoRA tensors itself. Through PEFT (what Trainer.save_model does) the same
    gathered dict, LoRA keys and all, came out as an adapter with no tensors on the H200 (FSDP1, one process,
    peft 0.21.0); the count check below makes any such save fail loudly instead of leaving an untrained adapter.
    """
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    tensors = None
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every rank calls it
        if is_main():
            tensors = adapter_tensors(model, full)
    if is_main():
        from safetensors import safe_open
        from safetensors.torch import save_file
        with atomic_dir(run.adapter) as tmp:
            if tensors is None:
                model.save_pretrained(str(tmp), safe_serialization=True)
            else:
                save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
                model.peft_config[model.active_adapter].save_pretrained(str(tmp))
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(str(tmp))
            missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (tmp / f).is_file()]
            if missing:
                raise RuntimeError(f"saving the adapter wrote no {', '.join(missing)} in {tmp}")
            with safe_open(str(tmp / "adapter_model.safetensors"), "pt") as f:
                n = len(list(f.keys()))
            if n != n_lora:  # never leave an empty or partial adapter that merge would take as trained
                raise RuntimeError(f"the saved adapter holds {n} tensors, {n_lora} expected")
    barrier()


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
def output_sizes(cfg: Config, skeleton, n_train_rows: int, world_size: int) -> dict[str, int]:
    """Bytes the run will write, from the model's structure: each checkpoint holds the LoRA weights (fp32)
    and the optimizer's state for them (two fp32 moments for AdamW), plus tokenizer and small state files;
    the merged model later holds every parameter in merge.dtype (2 bytes)."""
    targets = cfg.lora.target_modules
    head = output_head_name(skeleton)
    names = set(linear_module_names(skeleton)) - ({head} if targets == "all-linear" else set())
    wanted = names if targets == "all-linear" else set(targets)
    lora = 0
    for full, mod in skeleton.named_modules():
        if full.rsplit(".", 1)[-1] in wanted and hasattr(mod, "in_features"):
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
    n_params = sum(p.numel() for p in skeleton.parameters())
    t = cfg.train
    state_bytes = 2 if "8bit" in t.optim else 8
    ckpt = lora * (4 + state_bytes) + 32 * 2**20
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * math.ceil(n_train_rows / per_step))
    saves = steps // t.save_steps + 1  # +1: the save when stopping early or at the end
    kept = min(saves, t.save_total_limit + 1) if t.save_total_limit else saves  # +1: rotation deletes after saving
    adapter = lora * 4 + 32 * 2**20
    return {"lora_params": lora, "params": n_params, "checkpoints": kept * ckpt, "adapter": adapter,
            "merged": n_params * 2}


def check_disk(cfg: Config, run: RunDir, sizes: dict[str, int]) -> None:
    """Fail now if checkpoints and the adapter cannot fit; warn if the merged model later will not."""
    need = sizes["checkpoints"] + sizes["adapter"]
    probe, free = check_free_space(run.root, need,
                                   f"{sizes['checkpoints'] / 1e9:.2f} GB of checkpoints and the adapter")
    if free < need + sizes["merged"]:
        log.warning("after training, '%s' will have about %.1f GB free, but merge_adapter.py needs about %.1f GB "
                    "for the merged model; free space before merging", probe, (free - need) / 1e9,
                    sizes["merged"] / 1e9)


def preflight(cfg: Config, run: RunDir, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass --resume to continue the run in "
                        f"'{run.root}' or --overwrite to start it over")
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"paths.output_dir '{run.root}' is a file, not a folder; choose a new folder")
    # A killed earlier run's leftovers (a replaced run kept aside, temporary files) are settled first, by
    # one process only.
    if is_main():
        runlock.recover_leftovers(run.root)
    if run.holds_run() and not (overwrite or resume):
        raise UserError(f"run directory '{run.root}' already holds a run; pass --resume to continue it, "
                        "--overwrite to replace it, or set paths.output_dir to a new folder")
    if resume and not run.config.is_file():
        raise UserError(f"--resume: '{run.root}' holds no run to resume; drop --resume to start one")
    runlock.check_run_target(run.root, overwrite, resume)
    check_latest_pointer(cfg.paths.latest)
    check_library_options(cfg)
    if resume:
        done = complete_checkpoints(run.checkpoints)
        check_resume(cfg, run, ftkit_checkpoints.trained_step(done[-1]) if done else None)


def main(cfg: Config, overwrite: bool = False, resume: bool = False) -> dict:
    run = RunDir(Path(cfg.paths.output_dir))
    resume = resume or (cfg.train.resume == "auto" and not overwrite and run.config.is_file())
    preflight(cfg, run, overwrite, resume)
    # Bad data fails here, in about a second: before torch, the tokenizer or the model are loaded.
    loaded = data_stage.load_clean_split(cfg.data)

    import torch

    device = pick_device(cfg.train.device)
    if cfg.train.bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.bf16 is on but this GPU has no bf16; set train.bf16=false and "
                        "quant.bnb_4bit_compute_dtype=float16")
    info = check_distributed(cfg, device)
    barrier()

    # Everything that can fail on bad input fails here, before the run directory exists: the model's
    # structure (no weights yet), the LoRA targets, the data, the disk.
    source, offline = resolve_model(cfg.model)
    skeleton = model_skeleton(cfg, source, offline)
    validate_target_modules(skeleton, cfg.lora.target_modules)
    tok = load_tokenizer(cfg, source, offline)
    prep = data_stage.prepare(cfg, tok, loaded)
    if is_main():
        data_stage.print_report(prep.report)
    check_eval_settings(cfg, len(prep.eval.rows))
    check_disk(cfg, run, output_sizes(cfg, skeleton, len(prep.train.rows), info["world_size"]))
    # Every value the run decides for itself, decided once; a plan that cannot fit fails here.
    hw = detect_hardware(device, info["world_size"], info["fsdp"], info.get("fsdp_activation_checkpointing", False))
    plan = make_plan(cfg, hw, prep.train.lengths, skeleton.config)
    if is_main():
        log.info("%s", plan.describe())
        log.info("estimate for %s: %s", plan.gpu, json.dumps(plan.estimate))
    del skeleton
    # The training stack loads only now: a bad model or setting above fails in seconds, not after its import.
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer
    from datasets import Dataset
    set_seed(cfg.train.seed)
    model = load_quantized_base(cfg, source, offline, device)
    model, trainable, total = apply_lora(cfg, plan, model)
    n_lora = sum(1 for p in model.parameters() if p.requires_grad)
    apply_speed_switches(plan, model)
    log.info("device %s, world size %d%s, per-device batch %s x accumulation %d x %d processes = global batch %g "
             "rows a step", device, info["world_size"], " (FSDP)" if info["fsdp"] else "",
             f"{plan.pack_tokens} tokens" if plan.packing else plan.per_device_train_batch_size,
             plan.gradient_accumulation_steps, info["world_size"], plan.rows_per_step)

    if is_main():
        # Locked for the rest of the process; with --overwrite the old run stays aside until a checkpoint.
        runlock.start_run(run.root, overwrite=overwrite, resume=resume)
        save_resolved_config(cfg, run.config)
        atomic_write_json(run.plan, plan.to_json())
        write_manifest(cfg, run, prep.data_hash, {"world_size": info["world_size"], "fsdp": info["fsdp"],
                                                  "device": device, "resumed": resume})
        atomic_write_json(run.prompt_template, prep.template.to_json())
        atomic_write_json(run.dataset_report, prep.report)
        atomic_write_text(run.root / "eval_rows.jsonl", "".join(json.dumps(r) + "\n" for r in prep.eval_records))
        log.info("resolved config:\n%s", cfg.to_yaml())
    barrier()

    stop_flag = {"hit": False}
    callbacks = make_callbacks(run, stop_flag)
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = SFTTrainer(model=model, args=sft_config(cfg, run, plan, len(prep.eval.rows)),
                         train_dataset=Dataset.from_list(prep.train.rows),
                         eval_dataset=Dataset.from_list(prep.eval.rows) if prep.eval.rows else None,
                         processing_class=tok, callbacks=callbacks)
    if not info["fsdp"]:
        # TRL casts the LoRA weights of a quantized model to bf16, but a resume reloads them through PEFT,
        # which makes them fp32 again: the resumed run would train in another dtype than the first one.
        # Keep them fp32 from the start (as PEFT makes them; bf16 autocast still runs the matmuls in bf16).
        # Under FSDP they stay in the storage dtype, which FSDP needs and its sharded resume keeps.
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    log_first_batch(trainer.data_collator)
    if device == "cpu" and info["world_size"] > 1:
        allow_indexed_cpu_locations()

    ckpt = None
    if resume:
        done = complete_checkpoints(run.checkpoints)
        ckpt_step = 0
        if done:
            ckpt = str(done[-1])
            ckpt_step = json.loads((done[-1] / "trainer_state.json").read_text())["global_step"]
            log.info("resuming from %s (step %d)", ckpt, ckpt_step)
        else:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.checkpoints)
        if is_main():
            dropped = truncate_train_log(run.train_log, ckpt_step)
            if dropped:
                log.info("train_log.jsonl: dropped %d row(s) after step %d; the resumed run logs them again",
                         dropped, ckpt_step)
        barrier()

    # Under torchrun (accelerate launch) one stop request can reach a worker twice: a scheduler (SLURM,
    # Kubernetes) signals every process of the job, and the launcher forwards its own copy of the same signal.
    # That repeat must not abort the save. A real second Ctrl+C still aborts: it reaches the workers as SIGTERM
    # after SIGINT (the launcher's shutdown), and the launcher SIGKILLs them after its shutdown timeout anyway.
    launched = bool(os.environ.get("TORCHELASTIC_RUN_ID"))

    def on_signal(signum, frame):
        if stop_flag["hit"]:
            if launched and signum == stop_flag["hit"]:
                return  # the same request again (the launcher's forwarded copy)
            raise KeyboardInterrupt  # a second Ctrl+C means now
        stop_flag["hit"] = signum
        log.warning("%s: saving a checkpoint after this step, then stopping (Ctrl+C again to abort%s)",
                    signal.Signals(signum).name,
                    f"; the launcher kills the workers after {os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', '30')} s"
                    " (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)" if launched else "")
    # SIGTERM too: schedulers (SLURM, Kubernetes) send it before they kill a job.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.time() - t0
    state = trainer.state
    if stop_flag["hit"]:
        # 128 + signal number, as a shell reports a process stopped by the signal: the run did not finish,
        # so `make demo` and scripts chaining stages stop here, while the checkpoint makes it resumable.
        signum = int(stop_flag["hit"])
        if is_main():
            launcher = ("accelerate launch --config_file <the same accelerate config> " if info["world_size"] > 1
                        else "python ")
            print(f"stopped at step {state.global_step}; checkpoint saved in {run.checkpoints}. Resume with:\n"
                  f"  {launcher}finetune.py --config {run.config} --resume", file=sys.stderr)
        barrier()
        return {"interrupted": True, "step": state.global_step, "exit_code": 128 + int(signum)}

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
        "trainable_params": trainable, "total_params": total, "rows_per_step": plan.rows_per_step,
        "learning_rate": plan.learning_rate, "world_size": info["world_size"], "fsdp": info["fsdp"],
        "device": device, "resumed_from": ckpt, "plan": "plan.json",
    }
    save_adapter(trainer, run, n_lora)
    if is_main():
        atomic_write_json(run.summary, summary)
        write_latest(cfg, run)
        log.info("adapter written to %s; summary: %s", run.adapter, json.dumps(summary))
    barrier()
    return summary


def dry_run(cfg: Config) -> dict:
    """The training plan, with the predicted peak GPU memory and tokens/s of one optimizer step on the
    detected GPU (the calibrated reference GPU when none is visible), from the model's config, the data's
    token lengths and the constants measured on the H200 (ftkit/estimate.py, benchmarks/README.md).
    Loads no weights and writes nothing."""
    from ftkit.estimate import GPU_MEMORY_FRACTION
    from ftkit.models import causal_lm_config
    device = pick_device(cfg.train.device)
    source, offline = resolve_model(cfg.model)
    mconf = causal_lm_config(cfg, source, offline)
    lengths, note = [], ""
    try:
        prep = data_stage.prepare(cfg, load_tokenizer(cfg, source, offline))
        lengths = prep.train.lengths
    except UserError as e:
        note = f" (data not readable: {e}; rows assumed {cfg.data.max_length // 2} tokens)"
    world = dist_info()["world_size"]
    hw = detect_hardware(device, world, fsdp_enabled()) if device == "cuda" else reference_hardware(world, fsdp_enabled())
    plan = make_plan(cfg, hw, lengths, mconf, strict=False)
    est, big = plan.estimate, plan.estimate_largest
    where = plan.gpu if device == "cuda" else f"{plan.gpu} (no GPU detected here; the calibrated reference)"
    print(f"dry run: {cfg.model.name_or_path} on {where}{note}")
    print(plan.describe())
    print(f"  rows: mean {plan.mean_row_tokens} tokens; a typical micro-batch {plan.tokens_per_micro_batch} tokens, "
          f"the largest {plan.largest_micro_batch_tokens}")
    print(f"  predicted peak GPU memory {est['predicted_peak_gb']} GB (weights and optimizer {est['static_gb']} GB, "
          f"activations {est['activations_gb']} GB) of {plan.gpu_memory_gb} GB")
    print(f"  predicted {est['predicted_tokens_per_s']:.0f} real tokens/s, {est['predicted_step_s']} s a step "
          f"({est['flops_per_token'] / 1e9:.1f} GFLOP a token)")
    if plan.largest_micro_batch_tokens > plan.tokens_per_micro_batch:
        print(f"  largest micro-batch ({plan.largest_micro_batch_tokens} tokens): predicted peak "
              f"{big['predicted_peak_gb']} GB" + (f", {big['host_offload_gb']} GB in CPU RAM" if big["host_offload_gb"] else ""))
    elif est["host_offload_gb"]:
        print(f"  offloaded checkpoints: {est['host_offload_gb']} GB in CPU RAM")
    if not plan.fits:
        print(f"  warning: the largest micro-batch is predicted not to fit in {GPU_MEMORY_FRACTION:.0%} of the GPU "
              "(finetune.py would refuse it); lower data.max_length, train.pack_tokens or "
              "train.per_device_train_batch_size")
    return {"exit_code": 0, "dry_run": plan.to_json()}


def cli(argv) -> int:
    p = build_parser(__doc__, config_required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the training plan with its predicted peak GPU memory and tokens/s, then stop")
    a = parse_args(p, argv)
    if a.dry_run:
        return dry_run(load_config(a.config, a.overrides))["exit_code"]
    out = main(load_config(a.config, a.overrides), overwrite=a.overwrite, resume=a.resume)
    return out.get("exit_code", 0)


if __name__ == "__main__":
    run_main(cli)
