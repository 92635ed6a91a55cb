"""Training from a plan: the 4-bit base with LoRA and the planned speed switches, TRL's SFTConfig and trainer,
the callbacks (log, Ctrl+C, divergence, checkpoint hygiene), resume points, the run's start and end files,
and the adapter save (FSDP-aware, count-checked). finetune.py reads as the list of these steps."""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import patches, runlock
from .checkpoints import check_loads_as_tensors, complete_checkpoints, trained_step
from .cli import log
from .config import RL_METHODS, Config, check_library_options, mutates_base
from .distributed import barrier, dist_info, elastic_shutdown_timeout, is_main
from .errors import UserError
from .estimate import optim_state_bytes
from .jsonl import loads
from .models import check_adapter_loaded, load_causal_lm, load_tokenizer, model_skeleton, start_adapter, torch_dtype
from .paths import (
    RunDir,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_free_space,
    check_latest_pointer,
    check_own_dir,
    check_resume,
    save_resolved_config,
    write_latest,
    write_manifest,
)
from .plan import TrainPlan
from .quant import (
    build_bnb_config,
    linear_module_names,
    output_head_name,
    validate_modules_to_save,
    validate_target_modules,
)

# adapter/ is finetune's when it holds the adapter config it writes.
OWN_ADAPTER = ("adapter_config.json", "finetune.py")


# -- before anything is written ------------------------------------------------------------------------------
def open_run(cfg: Config, overwrite: bool, resume: bool) -> tuple[RunDir, bool]:
    """The run directory and whether this is a resume, after every rule about it: --overwrite and --resume,
    a finished run never replaced silently, a killed run's leftovers settled, the latest pointer, the text
    options the libraries check, and (on --resume) a config that matches the saved run. Writes nothing."""
    run = RunDir(Path(cfg.paths.output_dir))
    if overwrite and resume:
        raise UserError(
            "--overwrite and --resume contradict each other; pass --resume to continue the run in "
            f"'{run.root}' or --overwrite to start it over"
        )
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"paths.output_dir '{run.root}' is a file, not a folder; choose a new folder")
    # A killed earlier run's leftovers (a replaced run kept aside, temporary files) are settled first, by
    # one process only.
    if is_main():
        runlock.recover_leftovers(run.root)
    # Only now: the recovery may have put a replaced run back where a killed --overwrite had started anew.
    resume = resume or (cfg.train.resume == "auto" and not overwrite and run.config.is_file())
    if runlock.is_project_run(run.root) and not (overwrite or resume):
        raise UserError(
            f"run directory '{run.root}' already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or set paths.output_dir to a new folder"
        )
    if resume and not run.config.is_file():
        raise UserError(f"--resume: '{run.root}' holds no run to resume; drop --resume to start one")
    runlock.check_run_target(run.root, overwrite, resume)
    check_options(cfg)
    if resume:
        # Resuming writes into these: a link would have another run's (or the user's) folder written instead.
        if run.checkpoints.is_symlink():
            raise UserError(
                f"'{run.checkpoints}' is a symlink; a resume writes its checkpoints there, into the folder it points "
                "at: replace the link by a copy of the checkpoints, or start a new run in another paths.output_dir"
            )
        check_own_dir(run.adapter, *OWN_ADAPTER)
        done = complete_checkpoints(run.checkpoints)
        check_resume(cfg, run, trained_step(done[-1]) if done else None)
        if done:
            check_loads_as_tensors(done[-1])
    return run, resume


def check_options(cfg: Config) -> None:
    """What the config asks of the installed libraries and the launch, before any data or weights load; the dry
    run checks the same, so that it accepts nothing the real run refuses."""
    check_latest_pointer(cfg.paths.latest)
    check_library_options(cfg)


def inspect_model(cfg: Config, source: str, offline: bool):
    """(the model's structure on the meta device, its tokenizer), with the LoRA targets and model.adapter checked:
    no weights."""
    skeleton = model_skeleton(cfg, source, offline)
    validate_target_modules(skeleton, cfg.lora.target_modules)
    validate_modules_to_save(skeleton, cfg.lora.modules_to_save)
    start_adapter(cfg)
    return skeleton, load_tokenizer(cfg, source, offline)


def check_run_inputs(cfg: Config, run: RunDir, plan: TrainPlan, skeleton, n_train: int, n_eval: int) -> None:
    """Settings that only the plan, the data and the model's size can check: evaluation, and the disk (as many
    checkpoints as the planned steps save)."""
    check_eval_settings(cfg, n_eval)
    check_disk(cfg, run, output_sizes(cfg, skeleton, n_train, plan.rows_per_step))


def check_eval_settings(cfg: Config, n_eval: int) -> None:
    """Keeping the best checkpoint needs evaluations, and a checkpoint saved at every evaluated step."""
    t = cfg.train
    key = (
        "train.load_best_model_at_end"
        if t.load_best_model_at_end
        else "train.early_stopping_patience"
        if t.early_stopping_patience
        else None
    )
    if key is None or not t.eval_steps:
        return
    if n_eval == 0:
        raise UserError(
            f"{key} needs held-out rows to evaluate on, but data.eval_size leaves none; "
            f"set data.eval_size above 0 or turn {key} off"
        )
    if t.save_steps % t.eval_steps:
        fix = max(1, round(t.save_steps / t.eval_steps)) * t.eval_steps
        raise UserError(
            f"{key} keeps the checkpoint with the best eval loss, so train.save_steps ({t.save_steps}) "
            f"must be a multiple of train.eval_steps ({t.eval_steps}); set train.save_steps={fix}"
        )


def output_sizes(cfg: Config, skeleton, n_train_rows: int, rows_per_step: float) -> dict[str, int]:
    """Bytes the run will write, from the model's structure: each checkpoint holds the LoRA weights (fp32)
    and the optimizer's state for them (two fp32 moments for AdamW), plus tokenizer and small state files;
    the merged model later holds every parameter in merge.dtype (2 bytes)."""
    targets = cfg.lora.target_modules
    head = output_head_name(skeleton)
    names = set(linear_module_names(skeleton)) - ({head} if targets == "all-linear" else set())
    wanted = names if targets == "all-linear" else set(targets)
    lora = 0
    saved_whole = set(cfg.lora.modules_to_save or ())
    for full, mod in skeleton.named_modules():
        if full.rsplit(".", 1)[-1] in wanted and hasattr(mod, "in_features"):
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
        if any(full == m or full.endswith("." + m) for m in saved_whole):
            lora += sum(p.numel() for p in mod.parameters())  # trained and saved in full, optimizer state too
    n_params = sum(p.numel() for p in skeleton.parameters())
    t = cfg.train
    ckpt = lora * (4 + optim_state_bytes(t.optim)) + 32 * 2**20
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * math.ceil(n_train_rows / rows_per_step))
    saves = steps // t.save_steps + 1  # +1: the save when stopping early or at the end
    kept = min(saves, t.save_total_limit + 1) if t.save_total_limit else saves  # +1: rotation deletes after saving
    adapter = lora * 4 + 32 * 2**20
    return {
        "lora_params": lora,
        "params": n_params,
        "checkpoints": kept * ckpt,
        "adapter": adapter,
        "merged": n_params * 2,
    }


def check_disk(cfg: Config, run: RunDir, sizes: dict[str, int]) -> None:
    """Fail now if checkpoints and the adapter cannot fit; warn if the merged model later will not."""
    need = sizes["checkpoints"] + sizes["adapter"]
    probe, free = check_free_space(
        run.root, need, f"{sizes['checkpoints'] / 1e9:.2f} GB of checkpoints and the adapter"
    )
    if free < need + sizes["merged"]:
        log.warning(
            "after training, '%s' will have about %.1f GB free, but merge_adapter.py needs about %.1f GB "
            "for the merged model; free space before merging",
            probe,
            (free - need) / 1e9,
            sizes["merged"] / 1e9,
        )


# -- the model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    trainable: int
    total: int
    lora_tensors: int  # what the saved adapter must hold
    # PiSSA/OLoRA's LoRA weights at initialization, for the conversion at save; None for other inits.
    initial_lora: dict | None = field(default=None, compare=False, repr=False)


def build_model(cfg: Config, plan: TrainPlan, source: str, offline: bool):
    """The quantized base with LoRA and the planned model-side switches; (model, Params)."""
    from transformers import set_seed

    set_seed(cfg.train.seed)
    model = load_quantized_base(cfg, source, offline, plan.device, plan.fsdp)
    model, trainable, total, initial = apply_lora(cfg, plan, model)
    apply_speed_switches(plan, model)
    return model, Params(trainable, total, sum(1 for p in model.parameters() if p.requires_grad), initial)


def load_quantized_base(cfg: Config, source: str, offline: bool, device: str, fsdp: bool = False):
    """The frozen base, 4-bit (or 8-bit / full precision) on this process's device."""
    bnb = build_bnb_config(cfg.quant)
    # One whole copy per process on its own GPU: device_map="auto" would spread one model over all GPUs
    # and silently train on one of them under DDP.
    device_map = {"": dist_info()["local_rank"]} if device == "cuda" else {"": "cpu"}
    dtype = None
    if fsdp and cfg.quant.load_in_4bit:
        # FSDP-QLoRA: every weight, the packed 4-bit ones included, in the storage dtype, so FSDP can flatten
        # and shard them together (check_distributed made storage == compute == model dtype).
        dtype = torch_dtype(cfg.quant.bnb_4bit_quant_storage)
    model = load_causal_lm(cfg, source, offline, quantization_config=bnb, device_map=device_map, dtype=dtype)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def apply_lora(cfg: Config, plan: TrainPlan, model):
    from peft import prepare_model_for_kbit_training

    targets = validate_target_modules(model, cfg.lora.target_modules)
    fsdp = plan.fsdp
    if (cfg.quant.load_in_4bit or cfg.quant.load_in_8bit) and not fsdp and plan.upcast_frozen_fp32:
        # Casts norms to fp32 and enables input grads so checkpointing works through frozen 4-bit layers.
        # Not under FSDP: it needs one dtype per wrapped unit; the Trainer enables checkpointing there.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif (cfg.quant.load_in_4bit or cfg.quant.load_in_8bit) and not fsdp:
        # The same without the float32 upcast (train.upcast_frozen_fp32): frozen weights stay in model.dtype.
        for p in model.parameters():
            p.requires_grad_(False)
        if plan.gradient_checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Under FSDP the LoRA weights stay in the base's dtype instead of fp32, for the same reason.
    model = add_adapter(cfg, model, targets, fsdp)
    initial = None
    if mutates_base(cfg.lora.init_lora_weights):
        # PiSSA/OLoRA trained against the residual base W - BA; the saved adapter is converted with these
        # initial weights into a plain LoRA on W, the base merge and inference load (save_adapter).
        from peft import get_peft_model_state_dict

        initial = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, trainable, total, initial


def add_adapter(cfg: Config, model, targets: list[str], fsdp: bool):
    """A new LoRA adapter as the lora section says, or (model.adapter) the earlier run's adapter, trainable, with
    every one of its tensors checked to have loaded."""
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = start_adapter(cfg)
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True, autocast_adapter_dtype=not fsdp)
        check_adapter_loaded(model, folder, cfg.model.name_or_path)
        lc = model.peft_config["default"]
        log.info(
            "model.adapter: training on from %s (r=%s, lora_alpha=%s, targets %s; the lora section's are not used)",
            folder,
            lc.r,
            lc.lora_alpha,
            ",".join(sorted(lc.target_modules)),
        )
        return model
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=targets,
        bias=cfg.lora.bias,
        use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora,
        init_lora_weights=cfg.lora.init_lora_weights,
        modules_to_save=cfg.lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg, autocast_adapter_dtype=not fsdp)


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
        log.info(
            "tiled MLP: %d layers run their MLP in chunks of %d tokens",
            patches.use_tiled_mlp(model),
            model.config.hidden_size,
        )
    if plan.offload_layers:
        n = patches.offload_layer_inputs(model, plan.offload_layers)
        log.info(
            "activation offloading: the checkpointed inputs of %d of %d layers go to CPU RAM (~%.1f GB for "
            "the largest micro-batch)",
            n,
            len(patches.decoder_layers(model)),
            plan.estimate_largest["host_offload_gb"],
        )


# -- the trainer -------------------------------------------------------------------------------------------------
def trackers(cfg: Config) -> list[str]:
    """train.report_to as the integrations to run: "all" is every installed one, "none" is none."""
    if cfg.train.report_to == ["all"]:
        from transformers.integrations import get_available_reporting_integrations

        return list(get_available_reporting_integrations())
    return [r for r in cfg.train.report_to if r != "none"]


def tensorboard_callback(run: RunDir):
    """transformers' TensorBoardCallback writing into <run>/tensorboard/ rather than its default
    <output_dir>/runs/<date_host>/ (here: inside checkpoints/, where nobody looks for curves); the event files
    of a resumed run go to the same folder, and TensorBoard joins them by step."""
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    cb.logging_dir = str(run.tensorboard)  # what its TENSORBOARD_LOGGING_DIR sets, without touching os.environ
    return cb


def trainer_args(cfg: Config, run: RunDir, plan: TrainPlan):
    """The arguments of the trainer train.method runs: SFTConfig, or the preference method's TRL config."""
    if cfg.train.method == "sft":
        return sft_config(cfg, run, plan)
    if cfg.train.method in RL_METHODS:
        return grpo_config(cfg, run, plan)
    return preference_config(cfg, run, plan)


def common_args(cfg: Config, run: RunDir, plan: TrainPlan) -> dict:
    """transformers' TrainingArguments as every method takes them: the batch, learning rate and switches from the
    plan, everything else from the YAML."""
    from transformers import TrainingArguments

    t = cfg.train
    do_eval = plan.eval_steps is not None
    # transformers 5.24 (not 5.17) calls gradient_checkpointing activation_checkpointing: the old name warns on every
    # run and goes in v6; the versions before know only the old name.
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    recompute = "activation_checkpointing" if renamed else "gradient_checkpointing"
    return dict(
        output_dir=str(run.checkpoints),
        learning_rate=plan.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        # packed: one micro-batch is one packed row of train.pack_tokens tokens
        per_device_train_batch_size=plan.per_device_train_batch_size,
        per_device_eval_batch_size=plan.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        **{
            recompute: plan.gradient_checkpointing,
            f"{recompute}_kwargs": {"use_reentrant": False} if plan.gradient_checkpointing else None,
        },
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=plan.eval_steps,
        load_best_model_at_end=t.load_best_model_at_end or bool(t.early_stopping_patience),
        metric_for_best_model="eval_loss" if do_eval else None,
        greater_is_better=False if do_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        use_cpu=plan.device == "cpu",
        use_liger_kernel=plan.use_liger_kernel,
        dataloader_num_workers=t.dataloader_num_workers,
        # tensorboard goes through the callback make_trainer adds, which writes into the run directory.
        report_to=[r for r in trackers(cfg) if r != "tensorboard"] or "none",
        # GRPO's batches are prompts, which the Trainer cannot count (it warns each step); TRL counts them itself.
        include_num_input_tokens_seen="no" if t.method in RL_METHODS else "non_padding",
        save_only_model=False,
        disable_tqdm=not is_main(),
        # Every LoRA weight gets a gradient on every step; searching for unused ones costs a graph walk.
        ddp_find_unused_parameters=False if plan.world_size > 1 else None,
    )


def sft_config(cfg: Config, run: RunDir, plan: TrainPlan):
    """TRL's SFTConfig: the common arguments, and packing, padding-free rows and row length as the plan says."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(cfg, run, plan),
        max_length=plan.max_length,
        packing=plan.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        # The dataset arrives tokenized with labels: TRL sees input_ids and skips its own tokenizing and
        # templating, but still prepares it (packing, truncation), so its preparation is not skipped.
        dataset_kwargs={"skip_prepare_dataset": False},
        remove_unused_columns=True,
    )


def preference_config(cfg: Config, run: RunDir, plan: TrainPlan):
    """The preference method's TRL config: the common arguments and the method's options (config keys named as
    TRL's arguments); max_length is each side's prompt + answer, as data.max_length is for an SFT row."""
    from ftkit import experimental

    t = cfg.train
    # beta null: TRL's default (0.1 in all four)
    kw = dict(common_args(cfg, run, plan), max_length=plan.max_length, **({"beta": t.beta} if t.beta else {}))
    if t.method == "dpo":
        from trl import DPOConfig

        extra = {"loss_type": t.loss_type} if t.loss_type else {}
        return DPOConfig(**kw, **extra, loss_weights=t.loss_weights, padding_free=False)
    if t.method == "kto":
        from trl import KTOConfig

        return KTOConfig(**kw, **({"loss_type": t.loss_type[0]} if t.loss_type else {}))
    # ORPO and CPO batch the pairs with TRL's DPO collator, which needs the tokenized columns kept.
    if t.method == "orpo":
        return experimental.ORPOConfig(**kw, remove_unused_columns=False)
    return experimental.CPOConfig(
        **kw, loss_type="simpo", simpo_gamma=t.simpo_gamma, cpo_alpha=t.cpo_alpha, remove_unused_columns=False
    )


def grpo_config(cfg: Config, run: RunDir, plan: TrainPlan):
    """GRPOConfig: the common arguments and GRPO's options (config keys named as TRL's). Completions are logged by
    the project (completions.jsonl), not TRL's own table (parquet files and a rich printout)."""
    from trl import GRPOConfig

    t = cfg.train
    return GRPOConfig(
        **common_args(cfg, run, plan),
        **({"beta": t.beta} if t.beta is not None else {}),  # null: TRL's 0.0, no KL term and no reference pass
        **({"loss_type": t.loss_type[0]} if t.loss_type else {}),
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        reward_weights=t.reward_weights,
        use_vllm=plan.generator == "vllm",
        vllm_mode="colocate",
        log_completions=False,
    )


def load_rewards(cfg: Config, run: RunDir, prep, tok) -> list:
    """GRPO's rewards (ftkit/rewards.py), a user's file loaded with a warning and every reward tried on a training
    row; nothing for the other methods."""
    if cfg.train.method not in RL_METHODS:
        return []
    from ftkit import rewards

    return rewards.load(cfg.train, prep.train.rows, tok, lambda: last_good_note(run, "fix the reward"))


def build_trainer(cfg: Config, model, args, tok, prep, callbacks: list, reward_funcs: list = ()):
    """The trainer of train.method on the prepared rows. DPO and KTO get no reference model: with a PEFT model TRL
    compares with the model's own forward with the adapter disabled, the base, so no second copy is loaded."""
    from datasets import Dataset

    m = cfg.train.method
    kw = dict(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prep.train.rows),
        eval_dataset=Dataset.from_list(prep.eval.rows) if prep.eval.rows else None,
        processing_class=tok,
        callbacks=callbacks,
    )
    if m == "sft":
        from trl import SFTTrainer

        return SFTTrainer(**kw)
    if m in RL_METHODS:
        import trl

        # TRL stops sampling at the model's EOS ids and masks the completion after the first: the template's end
        # of turn (<|eot_id|>, <|im_end|>) must be among them, or a completion would run on past its answer.
        model.generation_config.eos_token_id = prep.template.stop_token_ids
        kw["eval_dataset"] = None  # the plan turns evaluation off: evaluate.py scores the held-out rows
        trainer = trl.GRPOTrainer(reward_funcs=list(reward_funcs), **kw)
        if not cfg.model.adapter:
            patches.drop_reference_adapter_copy(trainer.model)
        return trainer
    if m in ("dpo", "kto"):
        import trl

        trainer = (trl.DPOTrainer if m == "dpo" else trl.KTOTrainer)(ref_model=None, **kw)
        if not cfg.model.adapter:  # from model.adapter the copy is the reference: the model training starts from
            patches.drop_reference_adapter_copy(trainer.model)
        return trainer
    from ftkit import experimental

    return (experimental.ORPOTrainer if m == "orpo" else experimental.CPOTrainer)(**kw)


def make_trainer(
    cfg: Config,
    run: RunDir,
    plan: TrainPlan,
    model,
    tok,
    prep,
    args,
    stop: "StopRequest",
    lease: runlock.RunStart,
    reward_funcs: list = (),
):
    """The method's TRL trainer on the prepared rows, with the project's callbacks and patches; `lease` (the run
    folder being written) hears of each checkpoint; `reward_funcs`: GRPO's (load_rewards)."""
    from transformers import EarlyStoppingCallback

    callbacks = make_callbacks(run, plan, stop, lease)
    if "tensorboard" in trackers(cfg):
        callbacks.append(tensorboard_callback(run))
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    spent: dict = {}
    if reward_funcs:
        # First, so train_log.jsonl and TensorBoard see the sampling time it adds to the logs.
        callbacks.insert(0, sampling_time_callback(spent))
    if reward_funcs and cfg.train.log_completions:
        callbacks.append(completions_callback(run, reward_funcs, cfg.train))
    trainer = build_trainer(cfg, model, args, tok, prep, callbacks, list(reward_funcs))
    if reward_funcs:
        patches.time_calls(trainer, "_generate", spent)
    if not plan.fsdp:  # under FSDP the LoRA weights stay in the storage dtype, which FSDP and its resume need
        patches.keep_lora_fp32(trainer.model)
    rank = dist_info()["rank"]

    def first_rows(rows):
        log.info("rank %d of %d: first batch rows %s", rank, plan.world_size, ",".join(rows))

    trainer.data_collator = patches.log_first_batch(trainer.data_collator, first_rows)
    if plan.device == "cpu" and plan.world_size > 1:
        patches.allow_indexed_cpu_locations()
    return trainer


def make_callbacks(run: RunDir, plan: TrainPlan, stop: "StopRequest", lease: runlock.RunStart) -> list:
    # Interrupt before NonFinite: a Ctrl+C that asks for a save must see its weights checked first.
    return [
        train_log_callback(run),
        interrupt_callback(plan.world_size, stop),
        nonfinite_callback(run),
        no_pickled_args_callback(),
        first_checkpoint_callback(lease),
    ]


# One function a callback: each class is defined where transformers is imported, which happens only once
# training is certain to start.


def train_log_callback(run: RunDir):
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
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0, 4),
                "time": round(time.time(), 2),
                "elapsed_s": round(time.time() - self.t0, 2),
                "tokens_seen": state.num_input_tokens_seen,
                **logs,
            }
            with open(run.train_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return TrainLog()


def sampling_time_callback(spent: dict):
    from transformers import TrainerCallback

    class SamplingTime(TrainerCallback):
        """GRPO's logs get sampling_s: the seconds a step spent sampling completions (the rest of step_time is the
        log-probabilities, the loss and the update), averaged over the steps since the last log."""

        def on_log(self, args, state, control, logs=None, **kw):
            times = spent.get("_generate") or []
            if logs is not None and "loss" in logs and times:
                logs["sampling_s"] = round(sum(times) / len(times), 3)
                times.clear()

    return SamplingTime()


def completions_callback(run: RunDir, reward_funcs: list, t):
    from transformers import TrainerCallback

    from ftkit import rewards

    recorder, weights = reward_funcs[0].recorder, rewards.weights(t)

    class Completions(TrainerCallback):
        """completions.jsonl: at each logging step, the completions sampled last, with each reward, appended (a
        resumed run continues the file, cut back to the checkpoint's step like train_log.jsonl)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or "loss" not in (logs or {}):
                return
            rows = recorder.rows(state.global_step, weights)
            if rows:
                with open(run.completions, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in rows))

    return Completions()


def interrupt_callback(world_size: int, stop: "StopRequest"):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        """Ctrl+C: finish the step in flight, save a checkpoint, stop.

        Under several processes every rank must stop at the same step, or the others would wait forever
        in the next gradient all-reduce: the flag is max-reduced across ranks after each step.
        """

        def on_step_end(self, args, state, control, **kw):
            if world_size > 1:
                import torch
                import torch.distributed as tdist

                flag = torch.tensor([float(stop.hit or 0)], device=args.device)  # the signal number
                tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
                stop.hit = int(flag.item()) or stop.hit
            if stop.hit:
                control.should_save = True
                control.should_training_stop = True
            return control

    return Interrupt()


def last_good_note(run: RunDir, fix: str, override: str = "") -> str:
    """What a run stopped by an error during training keeps: "; the last good checkpoint is ..., resume ...", for
    the end of its one-line error."""
    good = complete_checkpoints(run.checkpoints)
    if not good:
        return f"; no checkpoint was saved before it; {fix} and start again"
    return (
        f"; the last good checkpoint is {good[-1]}; {fix} and resume from it "
        f"(python finetune.py --config {run.config} --resume{' ' + override if override else ''})"
    )


def nonfinite_callback(run: RunDir):
    from transformers import TrainerCallback

    class NonFinite(TrainerCallback):
        """Stop at the first inf/NaN in the loss, the gradient norm or the LoRA weights, before a save could
        keep it: a run that goes on trains nothing but NaN and would exit 0 with an unusable adapter. The
        weights are checked on each step that logs or saves (DefaultFlowCallback, called first, has decided
        that), and the error names the newest checkpoint saved before, which holds finite weights."""

        def _fail(self, state, what: str):
            keep = last_good_note(run, "lower train.learning_rate (or train.max_grad_norm)", "train.learning_rate=...")
            raise UserError(f"training diverged at step {state.global_step}: {what} is not finite (inf or NaN){keep}")

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

    return NonFinite()


def no_pickled_args_callback():
    from transformers import TrainerCallback

    class NoPickledArgs(TrainerCallback):
        """The Trainer pickles its arguments into every checkpoint (training_args.bin); a resume never reads
        it, and a pickle runs code when loaded. Checkpoints keep only what a resume loads: safetensors,
        JSON, and the optimizer/scheduler/RNG tensors, which the Trainer loads with weights_only=True."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(
                    missing_ok=True
                )

    return NoPickledArgs()


def first_checkpoint_callback(lease: runlock.RunStart):
    from transformers import TrainerCallback

    class FirstCheckpoint(TrainerCallback):
        """With --overwrite the replaced run is kept aside until the new run can be resumed; now it can."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                lease.checkpoint_saved()

    return FirstCheckpoint()


# -- start, resume, stop -------------------------------------------------------------------------------------------
def start_run(run: RunDir, overwrite: bool, resume: bool) -> runlock.RunStart:
    """The run directory, created and locked by the main process until the returned RunStart's `with` block
    ends. With --overwrite the replaced run stays aside until the new run's first checkpoint."""
    lease = runlock.start_run(run.root, overwrite=overwrite, resume=resume) if is_main() else None
    barrier()  # the other processes start once the folder exists
    return lease or runlock.RunStart.other_rank()


def write_run_start(cfg: Config, run: RunDir, plan: TrainPlan, prep, resume: bool) -> None:
    """What the run starts from: config.yaml (what was asked), plan.json (what runs), manifest, prompt
    template, dataset report and held-out rows."""
    if is_main():
        save_resolved_config(cfg, run.config)
        atomic_write_json(run.plan, plan.to_json())
        write_manifest(
            cfg,
            run,
            prep.data_hash,
            {"world_size": plan.world_size, "fsdp": plan.fsdp, "device": plan.device, "resumed": resume},
        )
        atomic_write_json(run.prompt_template, prep.template.to_json())
        atomic_write_json(run.dataset_report, prep.report)
        atomic_write_text(run.eval_rows, "".join(json.dumps(r) + "\n" for r in prep.eval_records))
        log.info("resolved config:\n%s", cfg.to_yaml())
    barrier()


def resume_point(run: RunDir) -> str | None:
    """The newest complete checkpoint (cut-off or corrupt ones skipped, loudly), with train_log.jsonl cut back
    to it so that no step is logged twice; None to start from step 0."""
    done = complete_checkpoints(run.checkpoints)
    step, ckpt = 0, None
    if done:
        ckpt, step = str(done[-1]), trained_step(done[-1])
        log.info("resuming from %s (step %d)", ckpt, step)
    else:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.checkpoints)
    if is_main():
        truncate_train_log(run.completions, step)
        dropped = truncate_train_log(run.train_log, step)
        if dropped:
            log.info("train_log.jsonl: dropped %d row(s) after step %d; the resumed run logs them again", dropped, step)
    barrier()
    return ckpt


def truncate_train_log(path: Path, step: int) -> int:
    """Keep the log rows up to the checkpoint a resume starts from; the resumed run logs the later steps
    again. Drops a line cut off by a kill and the end-of-run summary row of an interrupted run. Returns
    the rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(row, dict) or row.get("step", 0) > step or "train_loss" in row:
            dropped += 1
            continue
        kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return dropped


class StopRequest:
    """Ctrl+C (SIGINT) or SIGTERM while training: finish the step in flight, save a checkpoint, stop; a second
    Ctrl+C aborts at once. `hit` is the signal number once asked (the Interrupt callback reads it).

    Under torchrun (accelerate launch) one stop request can reach a worker twice: a scheduler (SLURM,
    Kubernetes) signals every process of the job, and the launcher forwards its own copy of the same signal.
    That repeat must not abort the save. A real second Ctrl+C still aborts: it reaches the workers as SIGTERM
    after SIGINT (the launcher's shutdown), and the launcher SIGKILLs them after its shutdown timeout anyway."""

    def __init__(self):
        self.hit = 0
        self.shutdown_timeout = elastic_shutdown_timeout()
        self.launched = self.shutdown_timeout is not None

    def _on_signal(self, signum, frame):
        if self.hit:
            if self.launched and signum == self.hit:
                return  # the same request again (the launcher's forwarded copy)
            raise KeyboardInterrupt  # a second Ctrl+C means now
        self.hit = signum
        log.warning(
            "%s: saving a checkpoint after this step, then stopping (Ctrl+C again to abort%s)",
            signal.Signals(signum).name,
            f"; the launcher kills the workers after {self.shutdown_timeout} s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)"
            if self.launched
            else "",
        )

    def __enter__(self):
        # SIGTERM too: schedulers (SLURM, Kubernetes) send it before they kill a job.
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def interrupted(run: RunDir, plan: TrainPlan, trainer, stop: StopRequest) -> dict:
    """A stopped run: the resume command, and 128 + the signal number as the exit code (as a shell reports a
    process stopped by the signal), so that `make demo` and scripts chaining stages stop here."""
    step = trainer.state.global_step
    if is_main():
        launcher = "accelerate launch --config_file <the same accelerate config> " if plan.world_size > 1 else "python "
        print(
            f"stopped at step {step}; checkpoint saved in {run.checkpoints}. Resume with:\n"
            f"  {launcher}finetune.py --config {run.config} --resume",
            file=sys.stderr,
        )
    barrier()
    return {"interrupted": True, "step": step, "exit_code": 128 + int(stop.hit)}


# -- the end -------------------------------------------------------------------------------------------------------
def finish(
    cfg: Config, run: RunDir, plan: TrainPlan, trainer, result, params: Params, wall: float, resumed_from: str | None
) -> dict:
    """A final evaluation if the last step had none, the adapter (atomically), run_summary.json, and the
    latest-run pointer, written last."""
    state = trainer.state
    train_loss, eval_loss = final_losses(state.log_history)
    evaluated_at = [h["step"] for h in state.log_history if "eval_loss" in h]
    if trainer.eval_dataset is not None and (not evaluated_at or evaluated_at[-1] != state.global_step):
        eval_loss = trainer.evaluate()["eval_loss"]
    tokens = int(state.num_input_tokens_seen or 0)
    summary = {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0, 4),
        "wall_time_s": round(wall, 2),
        "trained_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "peak_memory_gb": peak_memory_gb(plan.device),
        "peak_memory_kind": "cuda_allocated" if plan.device == "cuda" else "cpu_rss",
        "first_train_loss": next((h["loss"] for h in state.log_history if "loss" in h), None),
        "final_train_loss": train_loss,
        "final_eval_loss": eval_loss,
        "train_loss_mean": mean_train_loss(state.log_history) if resumed_from else result.training_loss,
        "best_checkpoint": state.best_model_checkpoint,
        "best_metric": state.best_metric,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "rows_per_step": plan.rows_per_step,
        "learning_rate": plan.learning_rate,
        "world_size": plan.world_size,
        "fsdp": plan.fsdp,
        "device": plan.device,
        "resumed_from": resumed_from,
        "plan": "plan.json",
    }
    save_adapter(trainer, run, params.lora_tensors, params.initial_lora)
    if is_main():
        atomic_write_json(run.summary, summary)
        write_latest(cfg, run)
        log.info("adapter written to %s; summary: %s", run.adapter, json.dumps(summary))
    barrier()
    return summary


def adapter_tensors(model, full_state: dict) -> dict:
    """The active adapter's LoRA tensors out of a full state dict, keyed as PEFT writes adapter files
    ("...q_proj.lora_A.weight": the adapter name dropped)."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    tag = f".{name}."
    return {
        k.replace(tag, "."): v.detach().contiguous() for k, v in full_state.items() if tag in k and ".lora_" in k
    }  # lora_A/B, lora_embedding_A/B, lora_magnitude_vector (DoRA)


def save_adapter(trainer, run: RunDir, n_lora: int, initial: dict | None = None) -> None:
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

        with atomic_dir(run.adapter, *OWN_ADAPTER) as tmp:
            if tensors is None and initial is not None:
                import tempfile

                # PEFT's conversion (save_pretrained path_initial_model_for_weight_conversion): the trained and
                # the initial PiSSA/OLoRA factors concatenated into a rank-2r LoRA whose product is the change
                # from the original base, so merge and inference apply it to the base as it is on disk.
                with tempfile.TemporaryDirectory() as init_root:
                    init_dir = Path(init_root) / "initial"
                    init_dir.mkdir()
                    save_file(initial, str(init_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
                    model.save_pretrained(
                        str(tmp), safe_serialization=True, path_initial_model_for_weight_conversion=str(init_dir)
                    )
            elif tensors is None:
                # Only the trained adapter: from model.adapter TRL keeps a frozen "ref" copy beside it
                model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
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

        return round(torch.cuda.max_memory_allocated() / 1e9, 3)  # GB (1e9), as plan.json's predictions
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)  # Linux reports KiB


def mean_train_loss(history: list[dict]) -> float | None:
    """The mean training loss a step over the logged steps of a resumed run. Not the Trainer's `training_loss`:
    after a resume that sums the losses of this process's steps only and divides by every step of the run. Each
    logged loss is the mean over the steps since the previous log, so it is weighted by how many it covers."""
    total = steps = last = 0
    for h in history:
        if "loss" in h:
            total += h["loss"] * (h["step"] - last)
            steps += h["step"] - last
            last = h["step"]
    return total / steps if steps else None


def final_losses(history: list[dict]) -> tuple[float | None, float | None]:
    train = [h["loss"] for h in history if "loss" in h]
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    return (train[-1] if train else None), (ev[-1] if ev else None)
