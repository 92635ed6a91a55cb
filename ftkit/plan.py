"""The training plan: every value a run decides for itself (rows and tokens per micro-batch, accumulation,
learning rate, packing, attention, checkpointing, kernels, long-row switches and the memory/speed estimate),
decided once from the config, the data's token lengths and the hardware, then frozen and saved as plan.json.

The rule the plan keeps: by default the optimizer sees the rows a step the YAML asks for
(per_device_train_batch_size x gradient_accumulation_steps x processes) at the YAML's learning rate. Speed
comes from how those rows are run (padding-free rows, no recompute where memory allows, fused kernels, fewer
and larger micro-batches in place of accumulation), never from a different batch. The one exception is the
throughput mode, `train.packing: true`, which the user asks for by name: token packs of `train.pack_tokens`,
with the learning rate rescaled by `train.lr_scaling` (benchmarks/README.md, "Time to quality").
Every value that differs from the YAML is a `Change` with its reason; finetune.py logs them in one block.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Sequence

from . import kernel_table
from .attention import VARLEN_ATTN, sdpa_supported
from .config import RL_METHODS, Config, explicitly_on
from .errors import UserError
from .estimate import (
    DEFAULT_GPU,
    GPU_MEMORY_FRACTION,
    REFERENCE_GPU_MEMORY,
    StepShape,
    estimate,
    fits_gpu,
    gpu_facts,
    host_memory_available,
    model_numbers,
    optim_state_bytes,
)


@dataclass(frozen=True)
class Hardware:
    """What the plan needs to know of the machine."""

    device: str  # "cuda" or "cpu"
    gpu_name: str = DEFAULT_GPU  # the calibrated reference GPU when there is none
    gpu_memory: float = REFERENCE_GPU_MEMORY  # bytes
    world_size: int = 1
    fsdp: bool = False
    fsdp_activation_checkpointing: bool = False  # the accelerate config already recomputes activations
    liger_installed: bool = False
    host_memory: float | None = None  # available CPU RAM (bytes) for offloaded checkpoints; None: unchecked

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def gpu_memory_gb(self) -> float:
        """The GPU's memory as plan.json records it: the planning and the plan's own `fits` judge this number."""
        return round(self.gpu_memory / 1e9, 1)


def detect_hardware(
    device: str, world_size: int = 1, fsdp: bool = False, fsdp_activation_checkpointing: bool = False
) -> Hardware:
    name, total = gpu_facts(device)
    return Hardware(
        device=device,
        gpu_name=name,
        gpu_memory=total,
        world_size=world_size,
        fsdp=fsdp,
        fsdp_activation_checkpointing=fsdp_activation_checkpointing,
        liger_installed=importlib.util.find_spec("liger_kernel") is not None,
        host_memory=host_memory_available() if device == "cuda" else None,
    )


def reference_hardware(world_size: int = 1, fsdp: bool = False) -> Hardware:
    """The calibrated GPU host, for predictions made on a machine without a GPU (its image has liger-kernel)."""
    return Hardware(device="cuda", world_size=world_size, fsdp=fsdp, liger_installed=True)


@dataclass(frozen=True)
class Change:
    """One planned value that differs from what the YAML says, and why."""

    key: str
    asked: Any
    planned: Any
    reason: str


@dataclass(frozen=True)
class TrainPlan:
    device: str
    world_size: int
    fsdp: bool
    rows_per_step: float  # rows the optimizer sees a step, all processes (a mean when packing)
    rows_per_micro_batch: float  # per process (a mean when packing)
    gradient_accumulation_steps: int
    tokens_per_micro_batch: int  # real tokens of a typical micro-batch (padded ones count when padding)
    largest_micro_batch_tokens: int  # what memory is planned for
    learning_rate: float
    lr_factor: float  # learning_rate / the YAML's
    packing: bool  # the throughput mode: token packs instead of rows
    pack_tokens: int | None
    padding_free: bool
    attn_implementation: str  # what training runs with
    gradient_checkpointing: bool
    use_liger_kernel: bool
    upcast_frozen_fp32: bool
    tiled_mlp: bool
    offload_layers: int
    method: str  # train.method
    trainer: str  # the TRL trainer that runs it
    reference: str | None  # what DPO/KTO compare with; None for methods without a reference
    generator: str | None  # GRPO: what samples the completions ("vllm" or "transformers"); None for the others
    # What TRL is told besides the batches (trainer_inputs): evaluation, and how long a row or pack may be.
    eval_steps: int | None  # evaluate the held-out rows every N steps; None: no evaluation
    per_device_eval_batch_size: int  # rows an eval micro-batch holds (packs, when packing)
    max_length: int | None  # TRL's max_length: the pack's length when packing; None: rows come cut already
    mean_row_tokens: float
    gpu: str
    gpu_memory_gb: float
    estimate: dict  # a typical step on `gpu` (CPU runs: what that GPU would do)
    estimate_largest: dict  # the largest micro-batch
    changes: tuple[Change, ...] = ()

    @property
    def per_device_train_batch_size(self) -> int:
        """The micro-batch the Trainer gets: one packed row when packing, else the planned rows."""
        return 1 if self.packing else int(self.rows_per_micro_batch)

    @property
    def fits(self) -> bool:
        return fits_gpu(self.estimate_largest["predicted_peak_gb"], self.gpu_memory_gb)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_device_train_batch_size"] = self.per_device_train_batch_size
        d["changes"] = [dataclasses.asdict(c) for c in self.changes]
        if self.generator is None:  # only GRPO samples
            del d["generator"]
        return d

    def describe(self) -> str:
        """The plan in one readable block: what runs, then every value that differs from the YAML and why."""
        per_device = f"{self.pack_tokens} tokens" if self.packing else str(self.per_device_train_batch_size)
        lines = [
            f"training plan: device {self.device}, world size {self.world_size}{' (FSDP)' if self.fsdp else ''}, "
            f"per-device batch {per_device} x accumulation {self.gradient_accumulation_steps} x "
            f"{self.world_size} processes = global batch {self.rows_per_step:g} rows a step"
            f"{' (a mean: packs hold whole rows)' if self.packing else ''}, learning rate {self.learning_rate:.3g}",
            f"  method {self.method} ({self.trainer}"
            + (f"; reference: {self.reference}" if self.reference else "")
            + (f"; completions sampled by {self.generator}" if self.generator else "")
            + f"), padding_free={self.padding_free}, attention={self.attn_implementation}, "
            f"gradient_checkpointing={self.gradient_checkpointing}, liger={self.use_liger_kernel}, "
            f"tiled_mlp={self.tiled_mlp}, offloaded_layers={self.offload_layers}",
        ]
        if self.changes:
            lines.append(
                "values that differ from the YAML (the saved config.yaml keeps what you asked; plan.json "
                "has what runs):"
            )

            def show(v):
                return f"{v:.3g}" if isinstance(v, float) else str(v)

            for c in self.changes:
                lines.append(f"  {c.key}: {show(c.asked)} -> {show(c.planned)}  ({c.reason})")
        else:
            lines.append("every value runs as the YAML says")
        return "\n".join(lines)

    def prediction(self) -> str:
        """describe() with the estimate: what --dry-run prints."""
        est, big = self.estimate, self.estimate_largest
        lines = [
            self.describe(),
            f"  rows: mean {self.mean_row_tokens} tokens; a typical micro-batch {self.tokens_per_micro_batch} "
            f"tokens, the largest {self.largest_micro_batch_tokens}",
            f"  predicted peak GPU memory {est['predicted_peak_gb']} GB (weights and optimizer {est['static_gb']} "
            f"GB, activations {est['activations_gb']} GB) of {self.gpu_memory_gb} GB",
            f"  predicted {est['predicted_tokens_per_s']:.0f} real tokens/s, {est['predicted_step_s']} s a step "
            f"({est['flops_per_token'] / 1e9:.1f} GFLOP a token)",
        ]
        if self.largest_micro_batch_tokens > self.tokens_per_micro_batch:
            host = f", {big['host_offload_gb']} GB in CPU RAM" if big["host_offload_gb"] else ""
            lines.append(
                f"  largest micro-batch ({self.largest_micro_batch_tokens} tokens): predicted peak "
                f"{big['predicted_peak_gb']} GB{host}"
            )
        elif est["host_offload_gb"]:
            lines.append(f"  offloaded checkpoints: {est['host_offload_gb']} GB in CPU RAM")
        if not self.fits:
            lines.append(
                f"  warning: the largest micro-batch is predicted not to fit in {GPU_MEMORY_FRACTION:.0%} of "
                "the GPU (finetune.py would refuse it); lower data.max_length, train.pack_tokens or "
                "train.per_device_train_batch_size"
            )
        return "\n".join(lines)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


class _Reasons(list):
    """The Changes one decision makes: a planned value that differs from the YAML's is recorded with its reason."""

    def change(self, key: str, asked, planned, reason: str):
        if asked != planned:
            self.append(Change(key, asked, planned, reason))
        return planned


def make_plan(
    cfg: Config, hw: Hardware, lengths: Sequence[int], mconf, *, eval_rows: int | None, strict: bool = True
) -> TrainPlan:
    """Decide the plan. `lengths`: the token lengths of the training rows (this process's view of the whole
    set); `eval_rows`: how many held-out rows there are (None: not known, as in a dry run that could not read the
    data); `mconf`: the model's config (no weights needed). Raises UserError, before any model loads, for a
    plan that cannot fit the GPU (unless `strict` is off, as for --dry-run) and for a throughput mode the data
    cannot fill. Reads cfg, never writes it.

    Six decisions, in order, each returning its values and the reasons for those that differ from the YAML:
    the method (its trainer and the switches it rules out), the kernels (liger by the measured table, or for
    memory), the batches (micro-batches, accumulation, the learning rate), recompute (checkpointing, tiled MLP,
    offloaded layers), whether the result fits, and what TRL is told besides (evaluation, row length). For a
    preference method a row is a pair: its length is both sides' tokens."""
    meth, why_method = method(cfg, hw, len(lengths) if lengths else None)
    rows = RowLengths.of(lengths, cfg.data.max_length)
    kern, why_kernels = kernels(cfg, hw, rows.mean, meth, sdpa=sdpa_supported(mconf))
    nums = model_numbers(mconf, cfg.lora.r, cfg.lora.target_modules)
    kern, why_kernels = liger_for_memory(cfg, hw, rows, nums, meth, kern, why_kernels, eval_rows)
    return _plan_with(cfg, hw, rows, nums, meth, kern, [*why_method, *why_kernels], eval_rows, strict)


def liger_for_memory(cfg, hw: Hardware, rows, nums, meth, kern: Kernels, why_kernels, eval_rows):
    """Liger's fused kernels keep fewer activations: where they are not measured faster they still go on when the
    plan fits only with them, since a run that does not fit is no faster. A method that rules liger out keeps it
    out."""
    liger_auto = cfg.train.use_liger_kernel == "auto" and hw.cuda and hw.liger_installed and meth.liger is None
    if not liger_auto or kern.liger:
        return kern, why_kernels
    plan = _plan_with(cfg, hw, rows, nums, meth, kern, why_kernels, eval_rows, strict=False)
    if plan.fits:
        return kern, why_kernels
    with_liger = dataclasses.replace(kern, liger=True)
    peak = plan.estimate_largest["predicted_peak_gb"]
    alt_peak = _plan_with(cfg, hw, rows, nums, meth, with_liger, [], eval_rows, strict=False).estimate_largest[
        "predicted_peak_gb"
    ]
    if alt_peak >= peak:
        return kern, why_kernels
    speed = next(c.reason for c in why_kernels if c.key == "train.use_liger_kernel")
    why = [c for c in why_kernels if c.key != "train.use_liger_kernel"]
    reason = (
        f"on for memory: the largest micro-batch is predicted at {alt_peak} GB with liger, {peak} GB without (by "
        f"speed alone: {speed})"
    )
    return with_liger, [Change("train.use_liger_kernel", "auto", True, reason), *why]


def _plan_with(
    cfg: Config, hw: Hardware, rows: RowLengths, nums: dict, meth, kern: Kernels, why_before, eval_rows, strict: bool
) -> TrainPlan:
    """make_plan's decisions after the method and the kernels (`why_before`: their reasons): batches, recompute,
    fit, what TRL is told."""
    cost = Cost(nums, hw, kern, rows.mean, cfg.train.optim)
    decide_batches = packed_batches if cfg.train.packing is True else row_batches
    bat, why_batches = decide_batches(cfg, hw, rows, cost)
    rec, why_recompute = recompute(cfg, hw, bat, cost)
    largest = fit(cfg, hw, bat, rec, cost, strict)
    given, why_given = trainer_inputs(cfg, kern, eval_rows)
    packing = cfg.train.packing is True
    return TrainPlan(
        device=hw.device,
        world_size=hw.world_size,
        fsdp=hw.fsdp,
        rows_per_step=round(bat.step_rows, 1),
        rows_per_micro_batch=round(bat.rows_micro, 2),
        gradient_accumulation_steps=bat.accum,
        tokens_per_micro_batch=round(bat.typical),
        largest_micro_batch_tokens=round(bat.worst),
        learning_rate=bat.lr,
        lr_factor=round(bat.lr / cfg.train.learning_rate, 4),
        packing=packing,
        pack_tokens=cfg.train.pack_tokens if packing else None,
        padding_free=kern.padding_free,
        attn_implementation=kern.attn,
        gradient_checkpointing=rec.gc,
        use_liger_kernel=kern.liger,
        upcast_frozen_fp32=kern.upcast,
        tiled_mlp=rec.tiled,
        offload_layers=rec.offload,
        method=cfg.train.method,
        trainer=meth.trainer,
        reference=meth.reference,
        generator=meth.generator,
        eval_steps=given.eval_steps,
        per_device_eval_batch_size=given.eval_batch,
        max_length=given.max_length,
        mean_row_tokens=round(rows.mean, 1),
        gpu=hw.gpu_name,
        gpu_memory_gb=hw.gpu_memory_gb,
        estimate=cost.est(bat.typical, bat.accum, rec.gc, rec.tiled, rec.offload),
        estimate_largest=largest,
        changes=(*why_before, *why_batches, *why_recompute, *why_given),
    )


# -- the method -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    trainer: str
    reference: str | None
    padding_free: bool | None  # None: the kernels decision decides; False: the trainer pads its batches
    liger: bool | None
    generator: str | None = None  # GRPO: what samples the completions, "vllm" or "transformers"


TRAINERS = {
    "sft": "trl.SFTTrainer",
    "dpo": "trl.DPOTrainer",
    "kto": "trl.KTOTrainer",
    "orpo": "trl.experimental.orpo.ORPOTrainer",
    "simpo": "trl.experimental.cpo.CPOTrainer (loss_type=simpo)",
    "grpo": "trl.GRPOTrainer",
}


def method(cfg: Config, hw: Hardware, n_prompts: int | None = None) -> tuple[Method, list[Change]]:
    """The trainer train.method runs, what DPO/KTO compare with, and the switches a preference trainer rules out:
    TRL's preference trainers build their own padded batches of both sides (DPOTrainer 1.16 turns its
    padding_free off with a warning) and compute log-probabilities themselves, where liger's fused loss is the SFT
    loss."""
    m, t, why = cfg.train.method, cfg.train, _Reasons()
    if m == "sft":
        return Method(TRAINERS[m], None, None, None), why
    reference = "the base model with the adapter disabled (no second copy)" if m in ("dpo", "kto") else None
    if m in RL_METHODS and t.beta:
        reference = f"the base model with the adapter disabled (no second copy), for the KL term (beta {t.beta})"
    if reference and cfg.model.adapter:
        reference = f"a frozen copy of model.adapter ({cfg.model.adapter}), the model training starts from"
    padding_free = why.change(
        "train.padding_free",
        t.padding_free,
        False,
        f"train.method={m}: {TRAINERS[m]} pads each batch of "
        + ("completions" if m in RL_METHODS else "pairs")
        + " itself (no padding-free path in TRL 1.16)",
    )
    # TRL 1.16's DPOTrainer takes liger's layer kernels (RMSNorm, RoPE, SwiGLU) and keeps its own fused LM head
    # for the log-probabilities, so the kernels decision decides for DPO as for SFT. The other trainers would swap
    # in liger's fused losses of their own, which nothing here has measured or checked.
    liger = None if m == "dpo" else t.use_liger_kernel
    if liger is not None and liger is not False:
        liger = why.change(
            "train.use_liger_kernel",
            liger,
            False,
            f"train.method={m}: the trainer computes "
            + ("the completions'" if m in RL_METHODS else "each side's")
            + " log-probabilities itself; liger's fused loss is the SFT loss",
        )
    generator = None
    if m in RL_METHODS:
        check_prompt_groups(cfg, hw, n_prompts)
        generator = generation(cfg, hw, why)
    return Method(TRAINERS[m], reference, padding_free, liger, generator), why


def check_prompt_groups(cfg: Config, hw: Hardware, n_prompts: int | None) -> None:
    """GRPO compares the train.num_generations completions of one prompt with each other, so a step's completions
    (TRL samples them all at once: per-device batch x accumulation x processes) hold whole groups, of distinct
    prompts: TRL's sampler drops a step it cannot fill, so fewer prompts than a step needs would train nothing."""
    t = cfg.train
    step = t.per_device_train_batch_size * t.gradient_accumulation_steps * hw.world_size
    if step % t.num_generations:
        times = t.num_generations // math.gcd(step, t.num_generations)
        raise UserError(
            f"train.num_generations={t.num_generations} completions a prompt do not divide a step's {step} "
            f"completions (train.per_device_train_batch_size={t.per_device_train_batch_size} x "
            f"gradient_accumulation_steps={t.gradient_accumulation_steps} x {hw.world_size} processes); make the "
            f"step a multiple of it, e.g. train.gradient_accumulation_steps={times * t.gradient_accumulation_steps}"
        )
    need = step // t.num_generations
    if n_prompts is not None and n_prompts < need:
        raise UserError(
            f"a step samples {t.num_generations} completions for each of {need} distinct prompts, and the training "
            f"data holds {n_prompts}; give more rows, or lower train.per_device_train_batch_size or "
            "gradient_accumulation_steps"
        )


def generation(cfg: Config, hw: Hardware, why: "_Reasons") -> str:
    """Where GRPO's completions come from: vLLM (colocated on the training GPU) where it is installed and a GPU
    trains, else transformers' generate inside TRL. (The project's own CUDA-graph decoder, ftkit/generation.py,
    serves a fixed model for inference; TRL 1.16 samples from the training model through generate or vLLM only.)"""
    asked = cfg.train.use_vllm
    installed = importlib.util.find_spec("vllm") is not None
    if asked is True and not (installed and hw.cuda):
        raise UserError(
            "train.use_vllm=true needs vLLM installed and a GPU ("
            + ("vLLM is not installed" if not installed else "no GPU here")
            + "); set train.use_vllm=auto to sample with transformers instead"
        )
    if asked == "auto":
        use = installed and hw.cuda and cfg.train.loss_type != ["vespo"]
        reason = (
            "vLLM is installed and a GPU trains: completions are sampled by vLLM, colocated"
            if use
            else "completions are sampled by transformers' generate inside TRL: "
            + (
                "vLLM is not installed (pip install vllm on a GPU machine samples faster)"
                if not installed
                else "no GPU"
            )
        )
        why.change("train.use_vllm", asked, use, reason)
        return "vllm" if use else "transformers"
    if asked and cfg.train.loss_type == ["vespo"]:
        raise UserError(
            "train.loss_type=vespo with vLLM needs an importance-sampling mode this config does not set (TRL 1.16); "
            "set train.use_vllm=auto (vespo then samples with transformers) or another train.loss_type"
        )
    return "vllm" if asked else "transformers"


# -- kernels ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernels:
    liger: bool
    padding_free: bool
    attn: str
    upcast: bool


def kernels(
    cfg: Config, hw: Hardware, mean_row_tokens: float, meth: Method | None = None, sdpa: bool = True
) -> tuple[Kernels, list[Change]]:
    """Liger's fused kernels, padding-free rows and the attention that keeps them apart, fp32 frozen weights
    (`meth`: what the method has decided of these already; `sdpa`: whether the architecture has an SDPA path)."""
    t, cuda, why = cfg.train, hw.cuda, _Reasons()
    if meth is not None and meth.liger is not None:
        liger = meth.liger
    elif t.use_liger_kernel == "auto":
        if cuda and hw.liger_installed:
            verdict = kernel_table.decide("liger", hw.gpu_name, micro_batch_tokens(cfg, hw, mean_row_tokens))
            liger, reason = verdict.on, verdict.reason
        else:
            liger = False
            reason = "liger's kernels need a CUDA GPU" if not cuda else "liger-kernel is not installed"
        liger = why.change("train.use_liger_kernel", "auto", liger, reason)
    else:
        liger = t.use_liger_kernel
        if liger and not cuda:
            raise UserError(
                "train.use_liger_kernel=true needs a CUDA GPU (its kernels are Triton GPU code); "
                "set train.use_liger_kernel=auto or false"
            )
        if liger and not hw.liger_installed:
            raise UserError(
                "train.use_liger_kernel=true but the liger-kernel package is not installed; "
                "pip install liger-kernel, or set train.use_liger_kernel=auto"
            )
    packing = t.packing is True
    if meth is not None and meth.padding_free is not None:
        padding_free = meth.padding_free
    elif t.padding_free == "auto" or packing:
        padding_free = why.change(
            "train.padding_free",
            t.padding_free,
            True,
            "packed rows are always padding-free"
            if packing
            else "no pad tokens computed: 1.59x the padded batches on the 2-core CPU demo, and what "
            "varlen attention builds on with a GPU",
        )
    else:
        padding_free = t.padding_free
    attn = cfg.model.attn_implementation
    if attn == "sdpa" and not sdpa:
        # the varlen attention below is SDPA too: it would drop what the architecture has SDPA lack (Gemma 2's
        # soft-capping); padding-free rows stay apart under eager through transformers' packed-sequence mask
        attn = why.change(
            "model.attn_implementation",
            "sdpa",
            "eager",
            "transformers has no SDPA path for this architecture (Gemma 2: SDPA cannot soft-cap attention logits)",
        )
    if padding_free and attn == "sdpa":
        attn = why.change(
            "model.attn_implementation",
            "sdpa",
            VARLEN_ATTN,
            "padding-free rows through varlen flash attention (SDPA row by row on CPU): each row "
            "attends to itself only, at the cost of its own length",
        )
    upcast = t.upcast_frozen_fp32
    if not cuda and not upcast and (cfg.quant.load_in_4bit or cfg.quant.load_in_8bit) and not hw.fsdp:
        upcast = why.change(
            "train.upcast_frozen_fp32",
            False,
            True,
            "on CPU bf16 elementwise work is slow; the frozen norms and embeddings run in float32",
        )
    return Kernels(bool(liger), bool(padding_free), attn, bool(upcast)), why


def micro_batch_tokens(cfg: Config, hw: Hardware, mean_row_tokens: float) -> float:
    """About the real tokens of a micro-batch, before the batches are decided (the kernel table is keyed by it):
    a pack, or on a GPU the step's rows as one micro-batch (what row_batches tries first), else the YAML's."""
    t = cfg.train
    if t.packing is True:
        return float(t.pack_tokens)
    rows = t.per_device_train_batch_size
    if hw.cuda and t.regroup_micro_batches:
        rows *= t.gradient_accumulation_steps
    return rows * mean_row_tokens


# -- what a step costs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowLengths:
    """The training rows' token lengths as the batch decisions need them."""

    lengths: tuple[int, ...]
    mean: float
    longest: int
    prefix: tuple[int, ...]  # prefix[k]: the tokens of the k longest rows

    @classmethod
    def of(cls, lengths: Sequence[int], max_length: int) -> "RowLengths":
        lengths = tuple(lengths)
        prefix = [0]
        for n in sorted(lengths, reverse=True):
            prefix.append(prefix[-1] + n)
        mean = sum(lengths) / len(lengths) if lengths else max_length / 2
        return cls(lengths, mean, max(lengths) if lengths else max_length, tuple(prefix))


class Cost:
    """The estimate of one step for this model, hardware and kernels, at a given shape; the one "fits" rule."""

    def __init__(self, nums: dict, hw: Hardware, kern: Kernels, mean_len: float, optim: str):
        self.nums, self.hw, self.kern, self.mean_len = nums, hw, kern, mean_len
        self.optim_bytes = optim_state_bytes(optim)

    def shape(self, tokens: float, micro: int, gc: bool, tiled: bool = False, offload: int = 0) -> StepShape:
        return StepShape(
            tokens_per_micro=tokens,
            micro_per_step=micro,
            gradient_checkpointing=gc,
            liger=self.kern.liger,
            mean_row_len=self.mean_len,
            upcast_fp32=self.kern.upcast,
            optim_state_bytes=self.optim_bytes,
            tiled_mlp=tiled,
            offload_layers=offload,
        )

    def est(self, tokens: float, micro: int, gc: bool, tiled: bool = False, offload: int = 0) -> dict:
        return estimate(self.nums, self.shape(tokens, micro, gc, tiled, offload), self.hw.gpu_name)

    def fits(self, tokens: float, micro: int, gc: bool, tiled: bool = False, offload: int = 0) -> bool:
        return fits_gpu(self.est(tokens, micro, gc, tiled, offload)["predicted_peak_gb"], self.hw.gpu_memory_gb)


# -- batches ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batches:
    rows_micro: float  # rows a micro-batch, per process (a mean when packing)
    accum: int
    typical: float  # tokens of a typical micro-batch
    worst: float  # tokens of the largest: what memory is planned for
    step_rows: float  # rows the optimizer sees a step, all processes
    lr: float
    gc: bool  # the checkpointing the fastest fitting split was found with; recompute() settles it


def gc_choices(cfg: Config, hw: Hardware) -> list[bool]:
    """The checkpointing values the batch search may pick from."""
    if hw.fsdp_activation_checkpointing:
        return [False]  # FSDP recomputes the wrapped layers itself; transformers refuses both at once
    if cfg.train.gradient_checkpointing == "auto":
        return [False, True] if hw.cuda else [False]
    return [bool(cfg.train.gradient_checkpointing)]


def check_packs(t, lengths: Sequence[int], packs_a_step: int) -> None:
    """The throughput mode's packs against the data: enough tokens for one step, and no row longer than a pack
    (TRL cuts such a row at the pack's end, so its answer's end and EOS would never be trained, silently)."""
    if not lengths:
        return
    total = sum(lengths)
    if total < t.pack_tokens * packs_a_step:
        raise UserError(
            f"train.packing=true (the throughput mode) fills each step with {packs_a_step} pack(s) of "
            f"{t.pack_tokens} tokens, but the training data holds only {total} tokens; lower "
            f"train.pack_tokens (e.g. {max(64, total // packs_a_step // 2)}) or set train.packing=false"
        )
    longer = sum(n > t.pack_tokens for n in lengths)
    if longer:
        raise UserError(
            f"train.pack_tokens={t.pack_tokens} is shorter than {longer} of {len(lengths)} training rows (the "
            f"longest {max(lengths)} tokens): a pack would cut them, and their ends and EOS would never be "
            f"trained; raise train.pack_tokens to at least {max(lengths)}, or lower data.max_length to "
            f"{t.pack_tokens} (rows are then dropped or truncated by data.too_long, and counted)"
        )


def packed_batches(cfg: Config, hw: Hardware, rows: RowLengths, cost: Cost) -> tuple[Batches, list[Change]]:
    """The throughput mode: one pack of train.pack_tokens a micro-batch, the learning rate rescaled."""
    t, why = cfg.train, _Reasons()
    B, A, W = t.per_device_train_batch_size, t.gradient_accumulation_steps, hw.world_size
    asked_rows = B * A * W
    check_packs(t, rows.lengths, A * W)
    rows_micro, pack = t.pack_tokens / rows.mean, float(t.pack_tokens)
    options = gc_choices(cfg, hw)
    gc = next((g for g in options if not hw.cuda or cost.fits(pack, A, g)), options[-1])
    step_rows = rows_micro * A * W
    lr = t.learning_rate * lr_scale(step_rows, asked_rows, t.lr_scaling)
    why.change(
        "rows a step",
        asked_rows,
        round(step_rows, 1),
        f"train.packing=true, the throughput mode: each micro-batch is one pack of {t.pack_tokens} tokens "
        f"(~{rows_micro:.0f} rows of {rows.mean:.0f} tokens)",
    )
    why.change(
        "train.learning_rate",
        t.learning_rate,
        lr,
        f"train.lr_scaling={t.lr_scaling} for {step_rows:.0f} rows a step instead of {asked_rows}",
    )
    why.change("train.per_device_train_batch_size", B, 1, "one packed row a micro-batch")
    return Batches(rows_micro, A, pack, pack, step_rows, lr, gc), why


def micro_tokens(rows: RowLengths, m: int, padding_free: bool, max_length: int) -> tuple[float, float]:
    """(typical, largest) tokens of an m-row micro-batch; padded batches pay the longest row."""
    k = min(m, len(rows.lengths)) if rows.lengths else m
    top_sum = rows.prefix[k] if rows.lengths else m * max_length
    if padding_free:
        return m * rows.mean, float(top_sum)
    return m * min(rows.longest, 2 * rows.mean), float(rows.longest * k)


def row_batches(cfg: Config, hw: Hardware, rows: RowLengths, cost: Cost) -> tuple[Batches, list[Change]]:
    """The YAML's rows a step at its learning rate, run as the fastest split into micro-batches that fits (and
    checkpointing to go with it)."""
    t, why = cfg.train, _Reasons()
    B, A = t.per_device_train_batch_size, t.gradient_accumulation_steps
    R, asked_rows = B * A, B * A * hw.world_size
    sizes = _divisors(R) if (hw.cuda and t.regroup_micro_batches) else [B]

    def tokens(m: int) -> tuple[float, float]:
        return micro_tokens(rows, m, cost.kern.padding_free, cfg.data.max_length)

    choices, options = gc_choices(cfg, hw), []
    for m in sizes:
        typ, big = tokens(m)
        for g in choices:
            if not hw.cuda or cost.fits(big, R // m, g):
                options.append((cost.est(typ, R // m, g)["predicted_step_s"], -m, g))
    if options:
        _, neg_m, gc = min(options)
        rows_micro = -neg_m
    else:  # nothing fits as is: the long-row switches get their chance on the smallest micro-batch
        rows_micro, gc = min(sizes), choices[-1]
    accum = R // rows_micro
    typical, worst = tokens(rows_micro)
    step_rows = float(asked_rows)
    if rows.lengths and len(rows.lengths) < asked_rows:
        step_rows = float(
            why.change(
                "rows a step",
                asked_rows,
                len(rows.lengths),
                f"the training data holds only {len(rows.lengths)} rows, fewer than one step's "
                f"{asked_rows}: every step is the whole set (lower the batch to keep more steps)",
            )
        )
    if rows_micro != B:
        why_split = (
            f"the same {asked_rows} rows a step as {accum} micro-batch(es) of {rows_micro} instead of {A} of {B}:"
            f" predicted {cost.est(typical, accum, gc)['predicted_step_s']} s a step"
            if hw.cuda
            else ""
        )
        if rows_micro > B:
            why_split += " (fewer, larger micro-batches; train.regroup_micro_batches=false keeps the YAML's split)"
        else:
            why_split += " (the YAML's micro-batch does not fit the GPU)"
        why.change("train.per_device_train_batch_size", B, rows_micro, why_split)
        why.change("train.gradient_accumulation_steps", A, accum, "see train.per_device_train_batch_size")
    return Batches(rows_micro, accum, max(typical, 1.0), worst, step_rows, t.learning_rate, gc), why


def lr_scale(rows_per_step: float, reference_rows: float, rule: str) -> float:
    """Learning-rate factor when a step holds rows_per_step rows instead of the reference_rows the rate was
    set for: square root (AdamW's usual rule), linear, or none."""
    if rule == "none" or reference_rows <= 0 or rows_per_step <= 0:
        return 1.0
    r = rows_per_step / reference_rows
    return math.sqrt(r) if rule == "sqrt" else r


# -- recompute: checkpointing, tiled MLP, offloaded layers --------------------------------------------------


@dataclass(frozen=True)
class Recompute:
    gc: bool
    tiled: bool
    offload: int  # decoder layers whose checkpointed inputs live in CPU RAM


def recompute(cfg: Config, hw: Hardware, bat: Batches, cost: Cost) -> tuple[Recompute, list[Change]]:
    """Checkpointing settled (the long-row switches need it), then the tiled MLP, then as few offloaded layers
    as make the largest micro-batch fit."""
    t, cuda, why = cfg.train, hw.cuda, _Reasons()
    offload_on = explicitly_on(t.activation_offloading)
    gc = bat.gc
    if t.gradient_checkpointing == "auto" or hw.fsdp_activation_checkpointing:
        # the long-row switches asked for by name work on checkpointed layers
        gc = bool(gc) or offload_on or t.tiled_mlp is True
        why.change(
            "train.gradient_checkpointing",
            t.gradient_checkpointing,
            gc,
            "the FSDP accelerate config recomputes activations itself"
            if hw.fsdp_activation_checkpointing
            else "no recompute: the largest micro-batch fits without it"
            if not gc
            else "the largest micro-batch does not fit without recompute",
        )
    if offload_on and not cuda:
        raise UserError(
            "train.activation_offloading=true needs a CUDA GPU (it moves GPU memory to CPU RAM); "
            "set it to auto or false"
        )
    if offload_on and hw.fsdp:
        raise UserError(
            "train.activation_offloading is not supported with FSDP; use fsdp_offload_params in the "
            "accelerate config instead, or set train.activation_offloading=false"
        )
    if t.tiled_mlp == "auto":
        needed = bool(cuda and gc and not cost.fits(bat.worst, bat.accum, True))
        tiled = why.change(
            "train.tiled_mlp",
            "auto",
            needed,
            "the largest micro-batch does not fit with checkpointing alone"
            if needed
            else "the largest micro-batch fits without it",
        )
    else:
        tiled = t.tiled_mlp
    layers = cost.nums["layers"]
    if t.activation_offloading is True:
        offload = layers
    elif offload_on:
        offload = min(int(t.activation_offloading), layers)
    elif t.activation_offloading == "auto" and cuda and gc and not hw.fsdp:
        # as few layers as make the step fit: each offloaded layer costs a copy out and back
        offload = next((n for n in range(layers + 1) if cost.fits(bat.worst, bat.accum, True, tiled, n)), layers)
    else:
        offload = 0
    if t.activation_offloading == "auto":
        why.change(
            "train.activation_offloading",
            "auto",
            offload,
            "the largest micro-batch fits without it"
            if not offload
            else f"the checkpointed inputs of {offload} layer(s) go to CPU RAM so the largest micro-batch fits",
        )
    return Recompute(bool(gc), bool(tiled), offload), why


# -- fit ----------------------------------------------------------------------------------------------------


def fit(cfg: Config, hw: Hardware, bat: Batches, rec: Recompute, cost: Cost, strict: bool) -> dict:
    """The estimate of the largest micro-batch; a UserError when it cannot fit CPU RAM or (strict) the GPU."""
    big = cost.est(bat.worst, bat.accum, rec.gc, rec.tiled, rec.offload)
    if rec.offload and hw.host_memory is not None and big["host_offload_gb"] * 1e9 > 0.9 * hw.host_memory:
        raise UserError(
            f"activation offloading needs {big['host_offload_gb']:.1f} GB of CPU RAM for the longest "
            f"micro-batch ({bat.worst:.0f} tokens) but {hw.host_memory / 1e9:.1f} GB is available; lower "
            f"data.max_length, train.pack_tokens or train.per_device_train_batch_size"
        )
    if strict and hw.cuda and not fits_gpu(big["predicted_peak_gb"], hw.gpu_memory_gb):
        t = cfg.train
        fixes = [
            "lower data.max_length",
            "train.pack_tokens" if t.packing is True else "train.per_device_train_batch_size",
        ]
        if t.gradient_checkpointing is False:
            fixes.append("set train.gradient_checkpointing=auto")
        raise UserError(
            f"the plan does not fit this GPU: its largest micro-batch ({bat.worst:.0f} tokens) is predicted "
            f"to need {big['predicted_peak_gb']} GB, and {GPU_MEMORY_FRACTION:.0%} of {hw.gpu_name}'s "
            f"{hw.gpu_memory / 1e9:.0f} GB is {GPU_MEMORY_FRACTION * hw.gpu_memory_gb:.1f} GB; "
            f"{', or '.join(fixes)} (finetune.py --dry-run shows the plan)"
        )
    return big


# -- what TRL is told besides the batches -------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerInputs:
    eval_steps: int | None  # None: no evaluation
    eval_batch: int
    max_length: int | None


def trainer_inputs(cfg: Config, kern: Kernels, eval_rows: int | None) -> tuple[TrainerInputs, list[Change]]:
    """Whether the held-out rows are evaluated, how many make an eval micro-batch, and TRL's max_length."""
    t, why = cfg.train, _Reasons()
    packing = t.packing is True
    eval_steps = t.eval_steps
    if eval_steps and t.method in RL_METHODS:
        eval_steps = why.change(
            "train.eval_steps",
            t.eval_steps,
            None,
            f"train.method={t.method} has no loss on the held-out rows; its evaluation would sample completions "
            "for every one each time: evaluate.py scores them (exact match, base vs tuned) after training",
        )
    if eval_steps and eval_rows == 0:
        eval_steps = why.change(
            "train.eval_steps",
            t.eval_steps,
            None,
            "no held-out rows to evaluate on (data.eval_size is 0, or every held-out row was dropped)",
        )
    eval_batch = t.per_device_eval_batch_size
    if packing:
        eval_batch = why.change(
            "train.per_device_eval_batch_size",
            eval_batch,
            1,
            f"train.packing=true: TRL packs the held-out rows too, and one pack of {t.pack_tokens} tokens is an "
            "eval micro-batch as it is a training one",
        )
    # SFT: TRL's max_length is the length of its packs when packing. Otherwise the rows arrive cut to
    # data.max_length already (data.too_long), so it changes nothing; and TRL refuses it with padding-free rows and
    # no packing. A preference method's max_length is each side's prompt + answer, as data.max_length says.
    if t.method in RL_METHODS:
        max_length = None  # GRPOConfig has none: the prompts were checked against data.max_length - completion
    elif t.method != "sft":
        max_length = cfg.data.max_length
    else:
        max_length = t.pack_tokens if packing else None if kern.padding_free else cfg.data.max_length
    return TrainerInputs(eval_steps, eval_batch, max_length), why
