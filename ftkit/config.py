"""The one typed config that every stage reads: YAML file, then dotted CLI overrides, validated with
did-you-mean for unknown keys, and the text options that TRL/transformers check, checked here first.

Key names follow the Hugging Face / PEFT / bitsandbytes argument they feed (`lora.r` is
`LoraConfig(r=...)`, `train.learning_rate` is `SFTConfig(learning_rate=...)`), so that a user who knows
those libraries can read a config without a glossary.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .jsonl import check_text, read_text
from .templates import TEMPLATES

# -- the config --------------------------------------------------------------------------------------
# Upper bounds on counts and sizes, checked here and nowhere else. Past them a value is a typo (a batch of 1e18, a
# source weight of 1e9): unchecked, it becomes a MemoryError in the data mix, a 10^14 GB "prediction" in the dry
# run, or a hang deep in a library, instead of one line naming the key.
MAX_ROWS_A_BATCH = 1 << 16  # rows a micro-batch, and micro-batches a step
MAX_TOKENS = 1 << 22  # tokens in a row or a pack: 4M, beyond any base model's context window
MAX_STEPS = 10**9
MAX_SOURCE_WEIGHT = 100  # each row of a source repeated at most 100 times in the mix
MAX_PATH_BYTES = 4096 - 256  # a run folder's path: its deepest file adds at most 256 bytes
DTYPES = Literal["bfloat16", "float16", "float32"]


class Section(BaseModel):
    # extra=forbid makes a typo an error instead of a silently ignored setting; allow_inf_nan=False because
    # an infinite learning rate or epoch count trains NaN weights or never ends, and YAML reads .inf/.nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelCfg(Section):
    name_or_path: str = "meta-llama/Meta-Llama-3-8B"
    revision: str | None = None
    # Off by default: remote code runs arbitrary Python from the hub.
    trust_remote_code: bool = False
    dtype: DTYPES = "bfloat16"
    # Any value the installed transformers accepts: eager, sdpa, flex_attention, flash_attention_2/3/4, their
    # paged| forms, a hub kernel ("kernels-community/flash-attn2"); checked against transformers' own registry
    # (and for the package each needs) before a model loads, by check_attn_implementation.
    attn_implementation: str = "sdpa"
    # When set and `name_or_path` does not exist yet, convert this GGUF file ("<python package>/<file>")
    # once into a standard HF checkpoint at `name_or_path`. The embedded demo model uses it.
    gguf_source: str | None = None
    # Start training from an earlier run's LoRA adapter instead of a new one (the SFT -> DPO/GRPO pipeline): a
    # run folder or its adapter/ folder. Its base must be model.name_or_path and its template the run's; its
    # rank, alpha and target modules replace the lora section's. DPO, KTO (and GRPO with beta > 0) then compare
    # with a frozen copy of this adapter, the model training starts from, rather than with the bare base.
    adapter: str | None = None


class QuantCfg(Section):
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: DTYPES = "bfloat16"
    # FSDP can only shard the 4-bit weights when they are stored in the same dtype as the rest.
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"

    @model_validator(mode="after")
    def _one_mode(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "quant.load_in_4bit and quant.load_in_8bit are both true; pick one "
                "(or neither for a full-precision base)"
            )
        return self


# PEFT's LoraConfig(init_lora_weights=) values that need no data pass and give an adapter the project can train,
# save, merge and serve. pissa and olora also rewrite the base weights (W - BA) at initialization; the final
# adapter is then converted back to a plain LoRA (rank 2r) on the untouched base (ftkit/train.py save_adapter).
LORA_INITS = ("gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora")
_LORA_INITS_NOT_HERE = {
    "loftq": "LoftQ replaces the base weights with its own quantization of them, so its adapter only fits that "
    "LoftQ-quantized base, never the base merge_adapter.py and inference.py load",
    "eva": "EVA initializes from the activations of a pass over the data (peft.initialize_lora_eva_weights), "
    "which this project does not run",
    "corda": "CorDA initializes from covariance statistics collected over the data (peft preprocess_corda), "
    "which this project does not run",
    "lora_ga": "LoRA-GA initializes from gradients estimated over the data, which this project does not run",
    "mica": "MiCA trains lora_A only and keeps lora_B frozen, and the adapter checks here expect every saved tensor "
    "to be trained",
}


def mutates_base(init) -> bool:
    """Whether lora.init_lora_weights rewrites the base weights (the residual W - BA) when LoRA is applied."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


class LoraCfg(Section):
    r: int = Field(16, ge=1, le=4096)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # A list of module names, or "all-linear" (every linear layer but the output head).
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    # DoRA: the update split into a magnitude and a direction (PEFT dequantizes 4-bit weights for it: slower).
    use_dora: bool = False
    # true: PEFT's default (A Kaiming-uniform, B zero: no change before training); false: A and B random;
    # gaussian, orthogonal (needs an even r), pissa / pissa_niter_N (needs quant.load_in_4bit=false), olora.
    init_lora_weights: bool | str = True
    # Modules trained in full and saved beside the LoRA weights, e.g. [lm_head, embed_tokens] for new tokens.
    modules_to_save: list[str] | None = None

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, v):
        import re

        if isinstance(v, bool) or v in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9]\d*", v):
            return v
        if v in _LORA_INITS_NOT_HERE:
            raise ValueError(
                f"lora.init_lora_weights={v} is not supported here: {_LORA_INITS_NOT_HERE[v]}; use true, gaussian, "
                "orthogonal, pissa or olora"
            )
        raise ValueError(
            f"lora.init_lora_weights={v!r} is not one of PEFT's initializations; use true, false, "
            f"{', '.join(LORA_INITS)}"
        )

    @model_validator(mode="after")
    def _nonempty(self):
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is empty; list module names or use 'all-linear'")
        if self.init_lora_weights == "orthogonal" and self.r % 2:
            raise ValueError(
                f"lora.init_lora_weights=orthogonal needs an even lora.r (PEFT splits one orthogonal basis between "
                f"A and B), got {self.r}; set lora.r={self.r + 1}"
            )
        if self.modules_to_save is not None and not self.modules_to_save:
            raise ValueError("lora.modules_to_save is empty; list module names (e.g. [lm_head]) or set it to null")
        return self


# The fields a data.columns mapping may rename: Alpaca's three, the conversation lists of the two chat formats,
# and ShareGPT's top-level system prompt.
DATA_COLUMNS = ("instruction", "input", "output", "messages", "conversations", "system")
# Prompt templates by name: the tokenizer's own, or a registered one; any other value must be a path to a Jinja
# chat template file.
TEMPLATE_NAMES = ("chat", *TEMPLATES)


def _check_columns(v: dict[str, str] | None) -> dict[str, str] | None:
    for key, col in (v or {}).items():
        if key not in DATA_COLUMNS:
            close = difflib.get_close_matches(key, DATA_COLUMNS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"data.columns names an unknown field '{key}'; {hint}it maps these fields to your file's "
                f"names: {', '.join(DATA_COLUMNS)}"
            )
        if not col.strip():
            raise ValueError(f"data.columns.{key} is empty; give the field name your file uses")
    by_col: dict[str, str] = {}
    for key, col in (v or {}).items():
        if col in by_col:
            raise ValueError(
                f"data.columns maps both {by_col[col]} and {key} to the column '{col}'; a column feeds one field: "
                "map each field to its own column"
            )
        by_col[col] = key
    return v


class DataSource(Section):
    """One entry of a data.path list: a file or hub dataset with its own format and field names (unset: the
    data section's), and how much of it goes into the mix."""

    path: str
    format: Literal["auto", "alpaca", "messages", "sharegpt"] | None = None  # a mix is SFT rows only
    columns: dict[str, str] | None = None
    split: str | None = None
    # The first max_rows rows, then `weight` times them in the training rows (0.5: a seeded half; 2: each
    # row twice). Held-out rows are taken before the weighting, so a repeated row is never also held out.
    max_rows: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0, le=MAX_SOURCE_WEIGHT)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, v):
        if isinstance(v, str):
            return {"path": v}  # a bare path in the list
        for key in v if isinstance(v, dict) else ():
            if key not in cls.model_fields:
                close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(
                    f"a data.path entry has an unknown key '{key}'; {hint}an entry takes {', '.join(cls.model_fields)}"
                )
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_columns(v)


class DataCfg(Section):
    # A file or hub dataset id, or a list of them (DataSource entries, or bare paths) mixed into one run.
    path: str | list[DataSource] = "yahma/alpaca-cleaned"
    split: str = "train"
    # How rows are read: "alpaca" (instruction/input/output), "messages" (OpenAI {"messages": [{role,
    # content}]}), "sharegpt" ({"conversations": [{from, value}]}); for preference methods (train.method)
    # "alpaca_preference" (instruction/input/chosen/rejected, LLaMA-Factory), "preference" (TRL's
    # prompt/chosen/rejected, as text or as message lists), "unpaired" (KTO's prompt/completion/label);
    # "auto" decides from the first rows.
    format: Literal["auto", "alpaca", "messages", "sharegpt", "alpaca_preference", "preference", "unpaired"] = "auto"
    # Field names of this file for the fields above, e.g. {instruction: question, output: answer}.
    columns: dict[str, str] = Field(default_factory=dict)
    # "alpaca": the Stanford Alpaca prompt (for conversations, the same layout turn after turn); "chat": the
    # tokenizer's own chat template (instruct bases); "llama3", "chatml": templates shipped by this project
    # for bases that have none; or a path to a Jinja chat template file.
    prompt_template: str = "alpaca"
    system_prompt: str | None = None
    max_length: int = Field(512, ge=16, le=MAX_TOKENS)
    # Rows held out for evaluation: a fraction (<1) or a row count (>=1).
    eval_size: float = Field(0.05, ge=0)
    max_samples: int | None = Field(None, ge=1)
    # What to do with rows that are only bad in part; counted in the dataset report either way.
    too_long: Literal["truncate", "drop", "fail"] = "drop"
    empty_output: Literal["drop", "fail"] = "drop"
    drop_duplicates: bool = True
    seed: int = 42

    @field_validator("eval_size")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        # 1.5 would silently hold out one row; the user most likely meant a percentage.
        if v >= 1 and v != int(v):
            raise ValueError(
                f"data.eval_size={v:g} is neither a fraction below 1 nor a whole row count; "
                f"write {v / 100:g} for {v:g}% of the rows or {round(v)} for {round(v)} rows"
            )
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_columns(v)

    @field_validator("path", mode="before")
    @classmethod
    def _entries(cls, v):
        # Each entry checked here, so that an error names the entry and its key instead of the union's
        # "should be a valid string".
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("data.path is an empty list; name at least one file or dataset")
        out = []
        for k, entry in enumerate(v, 1):
            try:
                out.append(DataSource.model_validate(entry))
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(str(x) for x in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] != "value_error":
                    msg += f" (got {short_repr(e.get('input'))})"
                raise ValueError(f"data.path entry {k}{f' ({key})' if key else ''}: {msg}") from None
        return out

    @field_validator("prompt_template")
    @classmethod
    def _template_name_or_file(cls, v: str) -> str:
        # A name is a bare word; a file is recognisable by its suffix or a folder in it, so that a typo
        # ("lama3") is reported as one instead of as a missing file.
        if v in TEMPLATE_NAMES or v.endswith((".jinja", ".j2")) or "/" in v or os.sep in v:
            return v
        close = difflib.get_close_matches(v, TEMPLATE_NAMES, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"data.prompt_template={v!r} is neither a template name nor a Jinja file; {hint}use one of "
            f"{', '.join(TEMPLATE_NAMES)}, or a path to a .jinja chat template"
        )


def explicitly_on(switch) -> bool:
    """A train.* switch the user set on: true, or a positive count (not false, 0 or "auto")."""
    return switch not in (False, 0, "auto")


# The preference methods, and which of them each method option feeds (its TRL config in the comment at the key).
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo")
# GRPO (TRL's GRPOTrainer): RL on prompts, with rewards computed from the completions (ftkit/rewards.py).
RL_METHODS = ("grpo",)
METHOD_OPTIONS = {
    "beta": (*PREFERENCE_METHODS, *RL_METHODS),
    "loss_type": ("dpo", "kto", "grpo"),
    "loss_weights": ("dpo",),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "num_generations": RL_METHODS,
    "max_completion_length": RL_METHODS,
    "temperature": RL_METHODS,
    "rewards": RL_METHODS,
    "reward_weights": RL_METHODS,
    "reward_format_regex": RL_METHODS,
    "reward_length_limit": RL_METHODS,
    "use_vllm": RL_METHODS,
    "log_completions": RL_METHODS,
}
# The loss_type values of TRL 1.16's DPOConfig and KTOConfig (tests/test_patches.py checks them against TRL).
LOSS_TYPES = {
    "dpo": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ),
    "kto": ("kto", "apo_zero_unpaired"),
    "grpo": ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo"),
}
# The rewards ftkit/rewards.py has built in; anything else in train.rewards is a user's FILE.py:FUNCTION.
BUILTIN_REWARDS = ("exact_match", "format", "length")


def reward_name(spec: str) -> str:
    """A reward's name in logs and completions.jsonl: a built-in's name, or FILE.FUNCTION for a user's (the path
    left out, so metric names stay readable: rewards/my_rewards.brevity/mean); check_rewards keeps them distinct."""
    if spec in BUILTIN_REWARDS:
        return spec
    file, _, func = spec.rpartition(":")
    return f"{Path(file).stem}.{func}"


def check_rewards(t) -> None:
    """train.rewards: built-in names or FILE.py:FUNCTION (the file is read when training starts), and one weight
    each when train.reward_weights is given."""
    if not t.rewards:
        raise ValueError("train.rewards is empty; GRPO needs at least one reward, e.g. [exact_match]")
    for r in t.rewards:
        if r in BUILTIN_REWARDS:
            continue
        file, _, func = r.rpartition(":")
        if not file.endswith(".py") or not func.isidentifier():
            close = difflib.get_close_matches(r, BUILTIN_REWARDS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"train.rewards: '{r}' is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor "
                f"FILE.py:FUNCTION; {hint}e.g. rewards: [exact_match, my_rewards.py:brevity]"
            )
    # Logged under FILE-stem.FUNCTION: two files of one name would share a metric.
    shown = [reward_name(r) for r in t.rewards]
    if len(set(shown)) != len(shown):
        raise ValueError(
            f"train.rewards names a reward twice ({t.rewards}; logged as {shown}); give each once (weigh it with "
            "train.reward_weights), and functions of files with the same name distinct names"
        )
    if t.reward_weights is not None and len(t.reward_weights) != len(t.rewards):
        raise ValueError(
            f"train.reward_weights has {len(t.reward_weights)} weights for {len(t.rewards)} rewards ({t.rewards}); "
            "give one weight per reward, in the same order"
        )
    if t.reward_format_regex is not None:
        try:
            re.compile(t.reward_format_regex)
        except re.error as e:
            raise ValueError(f"train.reward_format_regex is not a regular expression ({e}); fix the pattern") from None


def check_method_options(t) -> None:
    """A method option set for a method that has no such option, and loss types the method's trainer lacks."""
    for key, methods in METHOD_OPTIONS.items():
        # A saved config.yaml holds every key at its value: only a value other than the default is a choice.
        default = type(t).model_fields[key].get_default(call_default_factory=True)
        # Runs saved while beta's default was 0.1 (before GRPO) hold beta: 0.1 whatever their method.
        saved_default = key == "beta" and getattr(t, key) == 0.1
        if key in t.model_fields_set and getattr(t, key) != default and t.method not in methods and not saved_default:
            raise ValueError(
                f"train.{key} applies to train.method={' or '.join(methods)}, not {t.method}; remove it or change "
                "train.method"
            )
    if t.loss_type is not None:
        valid = LOSS_TYPES[t.method]
        bad = [x for x in t.loss_type if x not in valid]
        single = t.method in ("kto", "grpo")
        if bad or not t.loss_type or (single and len(t.loss_type) != 1):
            close = difflib.get_close_matches(bad[0], valid, n=1, cutoff=0.5) if bad else []
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"train.loss_type={t.loss_type} is not a {t.method} loss of TRL; {hint}valid: {', '.join(valid)}"
                + (" (one of them)" if single else "")
            )
    if t.beta == 0 and t.method in PREFERENCE_METHODS:
        raise ValueError(f"train.beta=0 leaves train.method={t.method} nothing to optimize; set it above 0 (TRL: 0.1)")
    if t.method in RL_METHODS:
        check_rewards(t)
    if t.loss_weights is not None and len(t.loss_weights) != len(t.loss_type or ["sigmoid"]):
        raise ValueError(
            f"train.loss_weights has {len(t.loss_weights)} weight(s) for {len(t.loss_type or ['sigmoid'])} "
            "train.loss_type value(s); give one weight a loss"
        )


class TrainCfg(Section):
    # Bounded where float32 still carries the step: 1e300 overflowed inside Adam as a traceback, while up to
    # 1e30 a run diverges and says so in one line (tests/test_faults.py makes runs diverge that way).
    learning_rate: float = Field(2e-4, gt=0, le=1e30)
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS)
    num_train_epochs: float = Field(1.0, gt=0, le=MAX_STEPS)
    per_device_train_batch_size: int = Field(4, ge=1, le=MAX_ROWS_A_BATCH)
    per_device_eval_batch_size: int = Field(8, ge=1, le=MAX_ROWS_A_BATCH)
    gradient_accumulation_steps: int = Field(4, ge=1, le=MAX_ROWS_A_BATCH)
    warmup_steps: float = Field(0.03, ge=0, le=MAX_STEPS)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "paged_adamw_8bit"
    # "auto": off when the estimate (ftkit/estimate.py) says the step fits in 85% of the GPU without it
    # (recompute costs ~1/3 more work), on otherwise; off on CPU.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    load_best_model_at_end: bool = False
    # numpy's generator, which transformers seeds too, takes 0 to 2**32 - 1.
    seed: int = Field(42, ge=0, le=2**32 - 1)
    bf16: bool = True
    # "auto": CPU when no CUDA device is visible.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Padding-free batches: rows concatenated with position_ids restarting per row, no pad tokens computed;
    # attention stays within each row (ftkit/attention.py "sdpa_varlen"). "auto": on (measured faster on CPU and GPU).
    padding_free: bool | Literal["auto"] = "auto"
    # The throughput mode, an explicit opt-in: pack rows (TRL best-fit-decreasing) into micro-batches of
    # `pack_tokens` tokens instead of per_device_train_batch_size rows. A step then holds more rows than the
    # YAML's per_device_train_batch_size x gradient_accumulation_steps, and the learning rate is rescaled by
    # `lr_scaling` from those rows to the packed rows a step (benchmarks/README.md, "Time to quality", says
    # what it costs in quality). Off: the optimizer sees exactly the YAML's rows a step. Implies padding_free.
    packing: bool = False
    pack_tokens: int = Field(16384, ge=64, le=MAX_TOKENS)
    lr_scaling: Literal["sqrt", "linear", "none"] = "linear"
    # With a GPU, run the YAML's rows a step as fewer, larger micro-batches (less accumulation) when the
    # estimate says they fit and are faster; the rows a step and the learning rate do not change.
    regroup_micro_batches: bool = True
    # Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy: no 128k-vocab logits in
    # memory). "auto": on with CUDA when this GPU's measured kernel table (benchmarks/results/kernel_table.json)
    # finds it faster at about this micro-batch size, or when the plan fits the GPU only with it; else off.
    use_liger_kernel: bool | Literal["auto"] = "auto"
    # peft.prepare_model_for_kbit_training's upcast of the frozen non-quantized weights (embeddings, head,
    # norms) to float32: 2 GB more for Llama-3-8B and float32 activations. Off, they stay in model.dtype
    # (on GPU; CPU runs keep the upcast).
    upcast_frozen_fp32: bool = False
    # For rows too long for the GPU even with checkpointing (tens of thousands of tokens and up). Both need
    # gradient checkpointing. "auto": on only when the estimate for the longest micro-batch exceeds 85% of
    # the GPU; off on CPU.
    # tiled_mlp: run each MLP (and its recompute) over the sequence in chunks of hidden_size tokens (as
    # DeepSpeed's and liger's TiledMLP), so its 3.5x-wide intermediates exist for one chunk at a time.
    tiled_mlp: bool | Literal["auto"] = "auto"
    # activation_offloading: keep the checkpointed layer inputs (2 bytes x hidden a token, per layer) in
    # pinned CPU RAM instead of GPU memory. true: every layer; N: the first N layers; "auto": as few layers
    # as make the longest micro-batch fit (plan.json records the number chosen; config.yaml keeps "auto").
    activation_offloading: bool | Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    dataloader_num_workers: int = Field(0, ge=0)
    # Trackers, as transformers' report_to: a list, one name or comma-separated names; "none" for no tracker,
    # "all" for every installed one. tensorboard writes its event files into <run>/tensorboard/, so
    # `tensorboard --logdir runs/<name>` shows the curves; each tracker's package is checked before the run.
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    resume: Literal["never", "auto"] = "never"
    # What training optimizes: "sft" (SFTTrainer on answers), or a preference method on chosen/rejected pairs:
    # "dpo" (TRL's DPOTrainer), "kto" (KTOTrainer, pairs or unpaired rows), "orpo" (trl.experimental's
    # ORPOTrainer), "simpo" (trl.experimental's CPOTrainer with loss_type=simpo). DPO and KTO compare with
    # the base with the adapter disabled: no second copy of the model.
    # "grpo": TRL's GRPOTrainer, RL on the rows' prompts with rewards from train.rewards.
    method: Literal["sft", "dpo", "orpo", "kto", "simpo", "grpo"] = "sft"
    # The method options, named as TRL's configs name them; each applies to the methods in METHOD_OPTIONS and
    # is an error with another method. beta: DPOConfig/KTOConfig/ORPOConfig/CPOConfig/GRPOConfig(beta=); null:
    # TRL's default, 0.1 for the preference methods, 0.0 for GRPO (no KL term, so no reference pass).
    beta: float | None = Field(None, ge=0, le=1e3)
    # DPOConfig(loss_type=) (a list combines losses with loss_weights: [sigmoid, sft] is RPO, which TRL 1.16
    # has instead of an rpo_alpha) or KTOConfig(loss_type=); null: TRL's default (sigmoid / kto).
    loss_type: list[str] | None = None
    loss_weights: list[Annotated[float, Field(ge=0, le=1e3)]] | None = None
    # CPOConfig(simpo_gamma=): SimPO's target reward margin.
    simpo_gamma: float = Field(0.5, ge=0, le=1e3)
    # CPOConfig(cpo_alpha=): the weight of CPO's NLL term on the chosen answers. 0 is SimPO as published; TRL's own
    # default (1.0) is CPO-SimPO.
    cpo_alpha: float = Field(0.0, ge=0, le=1e3)
    # GRPO (GRPOConfig's names). num_generations: completions sampled per prompt, compared with each other; a
    # step's completions (per_device_train_batch_size x gradient_accumulation_steps x processes) must be a
    # multiple of it. max_completion_length: tokens a completion may have (prompt + completion must fit
    # data.max_length). temperature: sampling temperature.
    num_generations: int = Field(8, ge=2, le=1024)
    max_completion_length: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0, le=10)
    # What a completion earns, summed with reward_weights (default 1 each): built-ins that read the row
    # (ftkit/rewards.py) -- exact_match (the completion's answer against the row's output / last assistant
    # turn, normalized as evaluate.py scores), format (the answer on one line, or matching reward_format_regex),
    # length (0 up to reward_length_limit completion tokens, then down to -1 at twice the limit) -- or
    # FILE.py:FUNCTION, a function of yours called as TRL calls rewards (prompts=, completions=,
    # completion_ids=, answer=, and the row's other fields), returning one number per completion. It runs
    # your code: finetune.py says so before it loads it.
    rewards: list[str] = Field(default_factory=lambda: ["exact_match"])
    reward_weights: list[Annotated[float, Field(ge=-1e3, le=1e3)]] | None = None
    reward_format_regex: str | None = None
    reward_length_limit: int = Field(64, ge=1)
    # Where completions come from: vLLM (GRPOConfig(use_vllm=), colocated on the training GPU) or transformers'
    # generate. "auto": vLLM when it is installed and a GPU runs the training; plan.json says which and why.
    use_vllm: bool | Literal["auto"] = "auto"
    # completions.jsonl in the run folder: every logging step, the sampled completions of that step with each
    # reward, so you can read what the model is learning.
    log_completions: bool = True

    @field_validator("loss_type", "rewards", mode="before")
    @classmethod
    def _loss_as_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, v):
        if v is None:
            return ["none"]
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        return v or ["none"]

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_no_auto(cls, v):
        if v == "auto":
            raise ValueError(
                "train.packing=auto is gone: by default a step now holds exactly the YAML's rows "
                "(padding-free, so no speed is lost); set train.packing=false, or train.packing=true "
                "for the throughput mode"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_steps == 0:
            # The Trainer reads 0 as "not set" and trains by epochs instead.
            raise ValueError(
                "train.max_steps=0 would train nothing; set a positive number of steps, or -1 to "
                "train for train.num_train_epochs"
            )
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("train.early_stopping_patience needs train.eval_steps (evaluation every N steps)")
        if self.load_best_model_at_end and not self.eval_steps:
            raise ValueError("train.load_best_model_at_end needs train.eval_steps")
        check_method_options(self)
        for k in ("tiled_mlp", "activation_offloading"):
            v = getattr(self, k)
            if explicitly_on(v) and self.gradient_checkpointing is False:
                raise ValueError(
                    f"train.{k}={str(v).lower()} needs gradient checkpointing; set train.gradient_checkpointing "
                    f"to true or auto"
                )
        return self


class MergeCfg(Section):
    # The dtype the merged checkpoint is saved in.
    dtype: Literal["bfloat16", "float16"] = "bfloat16"

    @field_validator("dtype", mode="before")
    @classmethod
    def _not_quantized(cls, v):
        if isinstance(v, str) and any(q in v.lower() for q in ("4bit", "8bit", "int4", "int8", "nf4", "fp4")):
            raise ValueError(
                f"merge.dtype={v}: merging into 4-bit or 8-bit weights would round the adapter's small "
                "updates away, so merges are into a bfloat16/float16 base; set merge.dtype=bfloat16 and "
                "quantize the merged model afterwards (export_gguf.py)"
            )
        return v

    # The dtype the merge and its check run in. float32 makes the check exact (it then tests the merge,
    # not bf16 rounding) and rounds W + BA once; it needs 4 bytes a parameter of memory.
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_shard_size: str = "5GB"
    # The merge checks itself on these prompts: merged vs base+adapter.
    check_prompts: list[str] = Field(
        default_factory=lambda: ["Give three tips for staying healthy.", "What is the capital of France?"]
    )
    # Merged vs base+adapter, both in compute_dtype. In float32 they agree to ~1e-4; in bf16 expect ~1.
    max_logit_diff: float = Field(0.05, gt=0)
    min_token_agreement: float = Field(0.99, ge=0, le=1)


class InferenceCfg(Section):
    max_new_tokens: int = Field(256, ge=1, le=MAX_TOKENS)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1, le=MAX_ROWS_A_BATCH)
    # "auto": the merged model when the run has one, else base + adapter.
    use: Literal["auto", "merged", "adapter", "base"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # generate's KV cache. "static": preallocated at fixed shapes (sized to the longest prompt + max_new_tokens,
    # rounded up to 256 tokens), which lets the decode step be compiled and replayed as CUDA graphs;
    # "dynamic": grows token by token (transformers' default). "auto": static on CUDA, dynamic on CPU.
    cache_implementation: Literal["auto", "dynamic", "static"] = "auto"
    # torch.compile the decode step; needs the static cache. On CUDA, greedy decoding (no repetition_penalty)
    # runs through ftkit/generation.py: the whole step is one CUDA graph (173 vs 12 tokens/s at batch 1 for an 8B
    # model on an H200, benchmarks/README.md); other settings through generate (mode "reduce-overhead").
    # The first batch of a process pays the compile (~40 s for an 8B model). "auto": on with CUDA, off on CPU.
    compile: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _compile_needs_static(self):
        if self.compile is True and self.cache_implementation == "dynamic":
            raise ValueError(
                "inference.compile=true needs a static KV cache; set inference.cache_implementation="
                "static (or auto), or inference.compile=false"
            )
        return self


class PathsCfg(Section):
    output_dir: str = "runs/llama3-alpaca"
    # Written last by each training run; stages run without --config follow it.
    latest: str = "runs/latest"

    @field_validator("output_dir", "latest")
    @classmethod
    def _usable_path(cls, v: str, info):
        if not v.strip():
            raise ValueError(f"paths.{info.field_name} is empty; name a folder, e.g. runs/my-run")
        # A newline or another control character is a paste or quoting slip, never meant: the folder would be
        # named unlike anything the user can type, and a line-based reader (the latest pointer) splits it.
        bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ValueError(
                f"paths.{info.field_name}={v!r} holds the control character {bad!r}; remove it (a newline or tab "
                "in a path is a quoting slip)"
            )
        # A shell expands ~ only at the start of a word it sees; from YAML or key=~/x it arrives literal.
        v = os.path.expanduser(v)
        # File systems allow 255 bytes a name and 4096 a path. The run folder's own name gets a suffix when a
        # replaced run is kept aside (".NAME.old-PID"), and the files inside it add their own path.
        parts = Path(v).parts
        for k, part in enumerate(parts, 1):
            limit = 255 - (len(".old-") + 12 if k == len(parts) else 0)
            if len(part.encode()) > limit:
                raise ValueError(
                    f"paths.{info.field_name} has a folder name of {len(part.encode())} bytes "
                    f"('{part[:40]}...'); at most {limit} fit; choose a shorter name"
                )
        if len(os.path.abspath(v).encode()) > MAX_PATH_BYTES:
            raise ValueError(
                f"paths.{info.field_name} is {len(os.path.abspath(v).encode())} bytes long as a full path; at most "
                f"{MAX_PATH_BYTES} leave room for the run's files within the file system's 4096; choose a shorter path"
            )
        return v


class Config(Section):
    model: ModelCfg = Field(default_factory=ModelCfg)
    quant: QuantCfg = Field(default_factory=QuantCfg)
    lora: LoraCfg = Field(default_factory=LoraCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    merge: MergeCfg = Field(default_factory=MergeCfg)
    inference: InferenceCfg = Field(default_factory=InferenceCfg)
    paths: PathsCfg = Field(default_factory=PathsCfg)

    @model_validator(mode="after")
    def _lora_init_fits_base(self):
        init, q = self.lora.init_lora_weights, self.quant
        if isinstance(init, str) and init.startswith("pissa") and (q.load_in_4bit or q.load_in_8bit):
            bits = "4" if q.load_in_4bit else "8"
            raise ValueError(
                f"lora.init_lora_weights={init} needs a full-precision base: PiSSA splits the base weights by SVD, "
                f"which PEFT cannot do on {bits}-bit weights; set quant.load_in_{bits}bit=false (more memory), "
                "or use olora, which works on a quantized base"
            )
        return self

    @model_validator(mode="after")
    def _method_fits(self):
        t = self.train
        compares_with_base = t.method in ("dpo", "kto") or (t.method == "grpo" and t.beta)
        if compares_with_base and not self.model.adapter and self.lora.init_lora_weights is not True:
            # The reference is the base with the adapter disabled, which is the starting model only when the
            # adapter starts as no change (B = 0); PiSSA/OLoRA even rewrite the base weights it would compare with.
            raise ValueError(
                f"train.method={t.method} compares with the base model (the adapter disabled), which is the model "
                f"training starts from only with lora.init_lora_weights=true, not {self.lora.init_lora_weights}; "
                "set lora.init_lora_weights=true"
            )
        if t.method in RL_METHODS and (t.load_best_model_at_end or t.early_stopping_patience):
            key = "load_best_model_at_end" if t.load_best_model_at_end else "early_stopping_patience"
            raise ValueError(
                f"train.method={t.method} has no held-out loss to pick the best checkpoint by or stop early on (its "
                f"evaluation is off; evaluate.py scores the run after training); remove train.{key}"
            )
        if t.method != "sft" and t.packing:
            raise ValueError(
                f"train.packing=true packs answers into token packs; train.method={t.method} trains on "
                f"{'sampled completions' if t.method in RL_METHODS else 'pairs of answers'} to one prompt, which "
                "TRL's trainers for it never pack: set train.packing=false"
            )
        if t.method in RL_METHODS and t.max_completion_length >= self.data.max_length:
            raise ValueError(
                f"train.max_completion_length={t.max_completion_length} leaves no room for a prompt in "
                f"data.max_length={self.data.max_length} (prompt + completion); lower train.max_completion_length "
                "or raise data.max_length"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


VALID_KEYS = _valid_keys(Config)
SECTIONS = list(Config.model_fields)


# The names users bring from Axolotl, LLaMA-Factory, Unsloth, TRL and transformers' scripts for what this
# project calls otherwise. Looked up by the last dotted part, so `lora_r`, `lora.lora_r` and `--lora_r` all
# find lora.r; a leaf that is a project key in another section (`max_steps` at the top) is found without a row.
ALIASES = {
    "lora_rank": "lora.r",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "alpha": "lora.lora_alpha",
    "lora_target": "lora.target_modules",
    "lora_target_modules": "lora.target_modules",
    "lora_target_linear": "lora.target_modules",
    "peft_use_rslora": "lora.use_rslora",
    "peft_use_dora": "lora.use_dora",
    "lora_modules_to_save": "lora.modules_to_save",
    "init_lora": "lora.init_lora_weights",
    "pissa_init": "lora.init_lora_weights",
    "base_model": "model.name_or_path",
    "model_name_or_path": "model.name_or_path",
    "pretrained_model_name_or_path": "model.name_or_path",
    "model_name": "model.name_or_path",
    "model_id": "model.name_or_path",
    "model_revision": "model.revision",
    "torch_dtype": "model.dtype",
    "flash_attention": "model.attn_implementation",
    "flash_attn": "model.attn_implementation",
    "sdp_attention": "model.attn_implementation",
    "dataset": "data.path",
    "datasets": "data.path",
    "dataset_name": "data.path",
    "data_path": "data.path",
    "dataset_dir": "data.path",
    "train_file": "data.path",
    "template": "data.prompt_template",
    "chat_template": "data.prompt_template",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "seq_len": "data.max_length",
    "model_max_length": "data.max_length",
    "val_set_size": "data.eval_size",
    "val_size": "data.eval_size",
    "test_size": "data.eval_size",
    "micro_batch_size": "train.per_device_train_batch_size",
    "batch_size": "train.per_device_train_batch_size",
    "train_batch_size": "train.per_device_train_batch_size",
    "eval_batch_size": "train.per_device_eval_batch_size",
    "num_epochs": "train.num_train_epochs",
    "epochs": "train.num_train_epochs",
    "lr": "train.learning_rate",
    "optimizer": "train.optim",
    "lr_scheduler": "train.lr_scheduler_type",
    "warmup_ratio": "train.warmup_steps",
    "sample_packing": "train.packing",
    "resume_from_checkpoint": "train.resume",
    "auto_resume_from_checkpoints": "train.resume",
    "quantization_bit": "quant.load_in_4bit",
    "output_dir": "paths.output_dir",
    "rl": "train.method",
    "pref_beta": "train.beta",
    "dpo_beta": "train.beta",
    "pref_loss": "train.loss_type",
    "rpo_alpha": "train.loss_weights",
    "save_dir": "paths.output_dir",
}


def alias_hint(name: str) -> str | None:
    """The project's key for a name from another tool (or a key given in the wrong place), else None."""
    leaf = name.split(".")[-1].lstrip("-").replace("-", "_")
    if leaf in ALIASES and ALIASES[leaf] != name:
        return ALIASES[leaf]
    same = [k for k in VALID_KEYS if k.split(".")[-1] == leaf and k != name]
    return same[0] if same else None


def _unknown(what: str, name: str) -> str:
    """The message for an unknown key: the project's name for it when it is another tool's, else the closest."""
    hint = alias_hint(name)
    if hint:
        return f"unknown {what} '{name}'; this project calls it {hint}"
    return f"unknown {what} '{name}'{_suggest(name)}"


def _suggest(key: str) -> str:
    leaf = key.split(".")[-1]
    # A right leaf in the wrong section (`train.r`) is the likeliest slip; then plain typos.
    cands = [k for k in VALID_KEYS if k.split(".")[-1] == leaf and k != key][:1]
    if not cands:
        cands = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if not cands:
        cands = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in VALID_KEYS], n=1, cutoff=0.6)
        cands = [k for k in VALID_KEYS if cands and k.endswith("." + cands[0])][:1]
    return f"; did you mean '{cands[0]}'?" if cands else f"; valid sections: {', '.join(SECTIONS)}"


def _check_unknown(raw: dict, where: str) -> None:
    for sec, body in raw.items():
        if sec not in Config.model_fields:
            raise UserError(f"{where}: {_unknown('config section', sec)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{sec}' must be a mapping of keys, got {type(body).__name__}")
        for key in body:
            if f"{sec}.{key}" not in VALID_KEYS:
                raise UserError(f"{where}: {_unknown('config key', f'{sec}.{key}')}")


def short_repr(value: Any, limit: int = 80) -> str:
    """repr for error messages, bounded: a YAML alias bomb is a few bytes of text that expands to billions
    of nested items, and a plain repr would exhaust memory while building the message."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, limit, limit
    return r.repr(value)[: limit + 20]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML keeps the last silently, so a
    forgotten earlier `learning_rate:` would win or lose by position alone."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key is not a plain value", key_node.start_mark
            ) from None
        if key in seen:
            raise UserError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1} (first at line "
                f"{seen[key]}); YAML keeps only one of them, so delete the other"
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# pydantic names the member of a union (`bool | Literal["auto"]`) a value failed in the error's location; those
# tags are not config keys
_UNION_TAGS = ("function-after", "literal", "list", "str", "bool", "int", "float", "dict", "none", "nullable")


def _config_key(loc) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(_UNION_TAGS)) or "config"


def _validation_message(err: ValidationError, where: str) -> str:
    errors = err.errors()
    e, key = errors[0], _config_key(errors[0]["loc"])
    got = e.get("input")
    got_s = short_repr(got) if not isinstance(got, dict) else "a mapping"
    # a union's value fails each member: say every form the key takes ("a valid boolean or 'auto'")
    msgs = [x["msg"].removeprefix("Value error, ") for x in errors if _config_key(x["loc"]) == key]
    msg = " or ".join(dict.fromkeys(msgs)) if e["type"] != "value_error" else msgs[0]
    if e["type"] == "value_error":
        return f"{where}: {msg}"
    return f"{where}: bad value for '{key}': {msg} (got {got_s}); fix it in the YAML or with {key}=VALUE"


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' is not KEY=VALUE; write for example train.max_steps=10")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1 and alias_hint(key):
        raise UserError(f"override: {_unknown('key', key)}; write {alias_hint(key)}=VALUE")
    if key.count(".") != 1:
        raise UserError(f"override key '{key}' must be section.key, for example train.max_steps{_suggest(key)}")
    if key.startswith("paths.") and value.strip() == "~":
        return key, "~"  # YAML reads a lone ~ as null; for a path it means the home folder
    try:
        # YAML typing makes `10` an int, `1e-4` a float, `[q_proj,v_proj]` a list, `null` None.
        parsed = yaml.load(value, Loader=_StrictLoader) if value.strip() else ""
    except UserError as e:
        raise UserError(f"override {key}: {e}") from None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and any(ord(c) < 32 for c in value):
        # YAML folds a newline in a plain scalar into a space: `paths.output_dir=$'a\nb'` would name the folder
        # "a b". A text value is kept as typed, so that what is checked and saved is what was asked.
        parsed = value
    if isinstance(parsed, dict) and any(":" in str(k) and v is None for k, v in parsed.items()):
        # YAML reads {a:b} as the key "a:b" with no value: a mapping needs a space after each colon.
        fixed = ", ".join(
            f"{k.split(':', 1)[0]}: {k.split(':', 1)[1]}" if v is None and ":" in str(k) else f"{k}: {v}"
            for k, v in parsed.items()
        )
        raise UserError(f"override {key}: a mapping needs a space after each colon; write {key}='{{{fixed}}}'")
    return key, parsed


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    raw: dict = {}
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        text = read_text(p, "config", "pass an existing YAML file, e.g. --config configs/demo.yaml")
        try:
            raw = yaml.load(text, Loader=_StrictLoader) or {}
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
        except RecursionError:  # PyYAML composes recursively: a hostile file of 100,000 brackets
            raise UserError(f"{p}: nested too deeply to be a config; fix the file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', e)}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    _check_unknown(raw, where)
    for item in overrides:
        key, value = parse_override(item)
        sec, leaf = key.split(".")
        _check_unknown({sec: {leaf: value}}, "override")
        raw.setdefault(sec, {})
        if raw[sec] is None:
            raw[sec] = {}
        raw[sec][leaf] = value
    raw = {k: (v if v is not None else {}) for k, v in raw.items()}
    for sec, values in raw.items():
        for leaf, value in values.items() if isinstance(values, dict) else ():
            check_text(value, f"{where}: {sec}.{leaf}", "write it as UTF-8 text")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_validation_message(err, where)) from None


# -- text options that only the libraries check ------------------------------------------------------
# TRL and transformers check train.optim, train.lr_scheduler_type and train.report_to only when the
# SFTConfig is built, which used to be after the run directory was written. The lists are read from the
# installed transformers' own source (its enums and its integration table) without importing it: the import
# pulls in torch (seconds), and these checks run before the data is even read.
_REPORT_PACKAGES = {
    "wandb": ("wandb",),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "neptune": ("neptune",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "codecarbon": ("codecarbon",),
    "azure_ml": ("azureml",),
    "flyte": ("flytekit",),
    "dagshub": ("dagshub",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
    "kubeflow": ("kubeflow",),
}
# The module each flash attention version imports and the pip name that installs it (transformers'
# FLASH_ATTENTION_COMPATIBILITY_MATRIX); without it transformers falls back to the `kernels` hub build.
_FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
    "flash_attention_4": ("flash_attn", "flash-attn-4"),
}
# transformers' pattern for a hub kernel ("org/repo[@revision][:function]"), loaded through `kernels`.
_HUB_KERNEL = r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$"


def _transformers_source(rel: str):
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / rel
    return ast.parse(f.read_text(encoding="utf-8")) if f.is_file() else None


def _enum_values(rel: str, cls: str) -> list[str] | None:
    import ast

    tree = _transformers_source(rel)
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            vals = [
                st.value.value
                for st in node.body
                if isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)
            ]
            return vals or None
    return None


def _dict_keys(rel: str, name: str) -> list[str] | None:
    import ast

    tree = _transformers_source(rel)
    for node in getattr(tree, "body", []):
        if (
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == name for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            return keys or None
    return None


def attention_values() -> list[str]:
    """The attn_implementation names the installed transformers accepts: "eager" and the keys of its
    AttentionInterface registry (read from source; the project's own "sdpa_varlen" is registered later, at
    training, and is not a user choice). A hub kernel id is accepted besides these."""
    import ast

    tree = _transformers_source("modeling_utils.py")
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.ClassDef) and node.name == "AttentionInterface":
            for st in node.body:
                if (
                    isinstance(st, ast.Assign)
                    and any(getattr(t, "id", None) == "_global_mapping" for t in st.targets)
                    and isinstance(st.value, ast.Dict)
                ):
                    keys = [k.value for k in st.value.keys if isinstance(k, ast.Constant)]
                    if keys:
                        return ["eager", "paged|eager", *(k for k in keys if k != "paged|eager")]
    from transformers.modeling_utils import AttentionInterface

    return ["eager", "paged|eager", *(k for k in AttentionInterface._global_mapping if k != "paged|eager")]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir()


def check_attn_implementation(attn: str) -> None:
    """model.attn_implementation against the installed transformers, and the package it needs, before any
    model loads (transformers would otherwise fail mid-load, or deep in the first forward)."""
    import importlib.util
    import re

    base = attn.removeprefix("paged|")
    if re.search(_HUB_KERNEL, base):
        if importlib.util.find_spec("kernels") is None:
            raise UserError(
                f"model.attn_implementation={attn} is a hub kernel, which needs the 'kernels' package, which is "
                "not installed; pip install kernels, or set model.attn_implementation=sdpa"
            )
        repo = re.split(r"[@:]", base)[0]
        if _hub_offline() and not _in_hub_cache(repo):
            raise UserError(
                f"model.attn_implementation={attn} is a hub kernel, which 'kernels' downloads from the Hugging Face "
                f"hub, but '{repo}' is not in the local cache and HF_HUB_OFFLINE is set; fetch it once online, "
                "or set model.attn_implementation=sdpa"
            )
        return
    valid = attention_values()
    if attn not in valid:
        raise UserError(_one_of("model.attn_implementation", attn, valid))
    if base in _FLASH_PACKAGES or base.startswith("flash_attention_"):
        mod, pip = _FLASH_PACKAGES.get(base, ("flash_attn", "flash-attn"))
        # Without the package transformers tries its hub build through 'kernels' (which transformers >= 5.25
        # installs, so its presence alone says nothing): a GPU kernel, useless on a CPU-only machine.
        if importlib.util.find_spec(mod) is None and not (importlib.util.find_spec("kernels") and _cuda()):
            raise UserError(
                f"model.attn_implementation={attn} needs the '{mod}' package, which is not installed, and a CUDA "
                "GPU (as does transformers' fallback, the hub build through 'kernels'); "
                f"pip install {pip}, or set model.attn_implementation=sdpa"
            )
    if base == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise UserError(
            f"model.attn_implementation={attn} needs torch's flex attention, which this torch lacks; "
            "install torch>=2.5, or set model.attn_implementation=sdpa"
        )


def library_values() -> dict[str, list[str]]:
    """The values transformers accepts for optim, lr_scheduler_type and report_to; from its source when
    that parses, else from the imported module (slower, same lists)."""
    out = {
        "optim": _enum_values("training_args.py", "OptimizerNames"),
        "lr_scheduler_type": _enum_values("trainer_utils.py", "SchedulerType"),
        "report_to": _dict_keys("integrations/integration_utils.py", "INTEGRATION_TO_CALLBACK"),
    }
    if not out["optim"]:
        from transformers.training_args import OptimizerNames

        out["optim"] = [o.value for o in OptimizerNames]
    if not out["lr_scheduler_type"]:
        from transformers.trainer_utils import SchedulerType

        out["lr_scheduler_type"] = [o.value for o in SchedulerType]
    if not out["report_to"]:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        out["report_to"] = list(INTEGRATION_TO_CALLBACK)
    return out


def _one_of(key: str, value: str, valid: list[str]) -> str:
    # transformers' names are case-sensitive; 'SDPA' or 'Cosine' is the commonest slip
    close = [v for v in valid if v.lower() == value.lower()] or difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"{key}={value!r} is not a value transformers accepts; {hint}valid: {', '.join(valid[:24])}"
        f"{', ...' if len(valid) > 24 else ''}"
    )


def check_library_options(cfg: "Config") -> None:
    """The text options TRL/transformers/bitsandbytes check late, checked now, with the packages they need."""
    import importlib.util

    vals = library_values()
    t = cfg.train
    if t.optim not in vals["optim"]:
        raise UserError(_one_of("train.optim", t.optim, vals["optim"]))
    if (
        ("8bit" in t.optim or "32bit" in t.optim or "bnb" in t.optim)
        and "torch" not in t.optim
        and importlib.util.find_spec("bitsandbytes") is None
    ):
        raise UserError(
            f"train.optim={t.optim} needs bitsandbytes, which is not installed; run `make install` or "
            "set train.optim=adamw_torch"
        )
    if t.lr_scheduler_type not in vals["lr_scheduler_type"]:
        raise UserError(_one_of("train.lr_scheduler_type", t.lr_scheduler_type, vals["lr_scheduler_type"]))
    targets = t.report_to
    for r in targets:
        if r in ("none", "all"):
            if len(targets) > 1:
                raise UserError(f"train.report_to={','.join(targets)} mixes '{r}' with other values; use it alone")
            continue
        if r not in vals["report_to"]:
            raise UserError(_one_of("train.report_to", r, ["none", "all", *vals["report_to"]]))
        mods = _REPORT_PACKAGES.get(r, (r,))
        if not any(importlib.util.find_spec(m) for m in mods):
            raise UserError(
                f"train.report_to={r} needs the '{mods[0]}' package, which is not installed; "
                f"pip install {mods[0]}, or set train.report_to=none"
            )
    check_attn_implementation(cfg.model.attn_implementation)
