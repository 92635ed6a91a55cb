"""Bad input, table-driven, through the real scripts as a user runs them.

Every case must end with exit code 2, one line on stderr that starts with "error:" and names the problem
(a keyword), no traceback, and nothing half-written: the run directory of a failed training is absent, and
a finished run that merge/inference read is byte-for-byte unchanged (no merged/, no temporary folders).

The cheap cases fail before torch or a model is loaded (config and data: well under a second each); the
model, merge and inference cases load at most a config, a tokenizer or the tiny 3M-parameter model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, copy_run, run_script, tiny_overrides

ROWS = [dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(4) for r in ALPACA_ROWS]
GOOD_JSON = json.dumps(ROWS)
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
LONG = " ".join(["word"] * 400)
# 9 levels of 9 references: ~4e8 leaves once expanded, a few hundred bytes as YAML.
ALIAS_BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi"))
    + "]"
)


@dataclass
class Case:
    id: str
    script: str
    args: list[str]  # placeholders: {tmp} {model} {run} {bert} {pickle} {other} {same_name} {quant4}
    keyword: str  # must appear in the one-line error
    files: dict = field(default_factory=dict)  # name under {tmp} -> str or bytes
    env: dict = field(default_factory=dict)
    unset: tuple = ()  # environment variables to remove
    max_s: float | None = None  # wall-clock bound, for the cases that must fail fast
    setup: str = ""  # a prepared folder under {tmp}: see prepare() below
    llamacpp: bool = False  # reaches llama.cpp before it fails: make test-all only (marked llamacpp)


def ft(*extra: str, data: str = "{tmp}/data.json") -> list[str]:
    """finetune.py on the tiny model with a good data file unless the case swaps it."""
    over = tiny_overrides(Path("{model}"), Path(data), Path("{tmp}/run"))
    return ["--config", str(REPO / "configs" / "demo.yaml"), *over, *extra]


def grpo(*extra: str, data: str = "{tmp}/data.json") -> list[str]:
    """finetune.py with train.method=grpo on the tiny model: 4 completions a prompt, 8 tokens each."""
    return ft("train.method=grpo", "train.num_generations=4", "train.max_completion_length=8", *extra, data=data)


def with_data(name: str, content) -> dict:
    return {name: content}


GOOD = {"data.json": GOOD_JSON}
# A messages file of the same conversations as ROWS (two turns each), as JSON lines.
CONV = [
    {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
    for r in ROWS
]
CONV_JSONL = "".join(json.dumps(r) + "\n" for r in CONV)
SYSTEM_REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Preference pairs of the same rows (train.method=dpo|kto|orpo|simpo): the answer against a wrong one.
PAIRS = [
    dict(instruction=r["instruction"], input=r["input"], chosen=r["output"], rejected=r["output"] + "!") for r in ROWS
]


def pairs_with(row: dict, at: int = 2) -> str:
    """The pairs file with `row` on line `at`."""
    rows = [json.dumps(r) for r in PAIRS]
    rows.insert(at - 1, json.dumps(row))
    return "\n".join(rows) + "\n"


# A user question, the assistant's tool call (OpenAI's form), the tool's output and the answer.
TOOL_CALL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "content": "18 C."},
]


def conv_with(row: dict) -> str:
    """The good messages file with one bad row appended (line 33)."""
    return CONV_JSONL + json.dumps(row) + "\n"


CASES = [
    # -- config ----------------------------------------------------------------------------------------
    Case(
        "config-invalid-yaml",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "invalid YAML at line",
        {"c.yaml": "train:\n  max_steps: [1,\n"},
    ),
    Case(
        "config-not-utf8",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "UTF-8",
        {"c.yaml": b"train:\n  seed: \xff\xfe\n"},
    ),
    Case(
        "config-top-level-list",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "mapping of sections",
        {"c.yaml": "- a\n- b\n"},
    ),
    Case(
        "config-section-not-mapping",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "must be a mapping",
        {"c.yaml": "lora: 5\n"},
    ),
    Case("config-missing-file", "finetune.py", ["--config", "{tmp}/nope.yaml"], "not found"),
    Case(
        "config-unknown-section",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "unknown config section 'trian'",
        {"c.yaml": "trian:\n  max_steps: 3\n"},
    ),
    Case("config-unknown-key", "finetune.py", ft("lora.rank=8"), "this project calls it lora.r", GOOD),
    Case("config-typo-key", "finetune.py", ft("train.learning_rat=1e-4"), "did you mean 'train.learning_rate'", GOOD),
    Case("config-other-tool-key", "finetune.py", ft("base_model=x"), "this project calls it model.name_or_path", GOOD),
    Case("config-other-tool-flag", "finetune.py", ft("--lora_r", "8"), "this project calls it lora.r", GOOD),
    Case("config-flag-without-value", "finetune.py", ft("--train.max_steps"), "needs a value", GOOD),
    Case(
        "config-other-tool-yaml-key",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "this project calls it data.max_length",
        {"c.yaml": "data:\n  sequence_len: 512\n"},
    ),
    Case("config-key-in-wrong-section", "finetune.py", ft("train.r=8"), "lora.r", GOOD),
    Case("config-wrong-type", "finetune.py", ft("lora.r=abc"), "lora.r", GOOD),
    Case("config-wrong-type-list", "finetune.py", ft("lora.target_modules=5"), "lora.target_modules", GOOD),
    Case("config-r-zero", "finetune.py", ft("lora.r=0"), "lora.r", GOOD),
    Case("config-negative-lr", "finetune.py", ft("train.learning_rate=-1e-4"), "train.learning_rate", GOOD),
    Case("config-dropout-one", "finetune.py", ft("lora.lora_dropout=1.0"), "lora.lora_dropout", GOOD),
    Case("config-max-length-tiny", "finetune.py", ft("data.max_length=8"), "data.max_length", GOOD),
    Case("config-override-not-key-value", "finetune.py", ft("max_steps"), "KEY=VALUE", GOOD),
    Case("config-4bit-and-8bit", "finetune.py", ft("quant.load_in_8bit=true"), "load_in_8bit", GOOD),
    Case(
        "config-early-stopping-without-eval",
        "finetune.py",
        ft("train.eval_steps=null", "train.early_stopping_patience=2"),
        "eval_steps",
        GOOD,
    ),
    Case("config-overwrite-and-resume", "finetune.py", ft("--overwrite", "--resume"), "contradict", GOOD),
    Case("config-resume-without-run", "finetune.py", ft("--resume"), "no run to resume", GOOD),
    Case("config-eval-size-too-big", "finetune.py", ft("data.eval_size=1000"), "data.eval_size", GOOD),
    Case(
        "config-output-dir-is-a-file",
        "finetune.py",
        ft("paths.output_dir={tmp}/afile"),
        "is a file",
        {**GOOD, "afile": "x"},
    ),
    Case(
        "config-output-dir-under-a-file",
        "finetune.py",
        ft("paths.output_dir={tmp}/afile/run"),
        "is a file",
        {**GOOD, "afile": "x"},
    ),
    Case(
        "config-fsdp-storage-mismatch",
        "finetune.py",
        ft(),
        "quant.bnb_4bit_quant_storage",
        GOOD,
        env={"ACCELERATE_USE_FSDP": "true"},
    ),
    Case(
        "config-fsdp-on-cpu",
        "finetune.py",
        ft("quant.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch"),
        "FSDP needs CUDA",
        GOOD,
        env={"ACCELERATE_USE_FSDP": "true"},
    ),
    Case(
        "config-fsdp2-on-cpu",
        "finetune.py",
        ft("quant.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch"),
        "FSDP needs CUDA",
        GOOD,
        env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    ),
    Case(  # the dry run runs the launch's checks as the real run does
        "dry-run-lora-init-olora-under-fsdp",
        "finetune.py",
        ft(
            "quant.bnb_4bit_quant_storage=bfloat16",
            "train.optim=adamw_torch",
            "lora.init_lora_weights=olora",
            "--dry-run",
        ),
        "under FSDP is not supported",
        GOOD,
        env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    ),
    Case(
        "lora-init-olora-under-fsdp",
        "finetune.py",
        ft("quant.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch", "lora.init_lora_weights=olora"),
        "under FSDP is not supported",
        GOOD,
        env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    ),
    Case(
        "config-max-length-below-prompt-fail",
        "finetune.py",
        ft("data.max_length=16", "data.too_long=fail"),
        "prompt alone exceeds data.max_length",
        GOOD,
    ),
    Case("config-max-length-below-prompt-drop", "finetune.py", ft("data.max_length=16"), "no training rows left", GOOD),
    Case(
        "disk-too-small-for-checkpoints",
        "finetune.py",
        ft("train.max_steps=100000000", "train.save_steps=2", "train.save_total_limit=null"),
        "not enough disk space",
        GOOD,
    ),
    # -- data ------------------------------------------------------------------------------------------
    Case(
        "data-malformed-json",
        "finetune.py",
        ft(),
        "line 3",
        {"data.json": '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'},
    ),
    Case(
        "data-malformed-jsonl",
        "finetune.py",
        ft(data="{tmp}/d.jsonl"),
        "line 3",
        {"d.jsonl": GOOD_JSONL.split("\n", 2)[0] + "\n" + GOOD_JSONL.split("\n", 2)[1] + "\n{broken\n"},
    ),
    Case(
        "data-malformed-csv",
        "finetune.py",
        ft(data="{tmp}/d.csv"),
        "line 3",
        {"d.csv": "instruction,input,output\nAdd,2 and 3,5\nName a color,,red,extra,cells\n"},
    ),
    Case(
        "data-csv-missing-column",
        "finetune.py",
        ft(data="{tmp}/d.csv"),
        "'output'",
        {"d.csv": "instruction,input\nAdd,2 and 3\n"},
    ),
    Case(
        "data-latin1-encoding",
        "finetune.py",
        ft(),
        "UTF-8",
        {"data.json": json.dumps([{"instruction": "caf\u00e9", "output": "x"}], ensure_ascii=False).encode("latin-1")},
    ),
    Case("data-utf16-encoding", "finetune.py", ft(), "UTF-8", {"data.json": GOOD_JSON.encode("utf-16")}),
    Case(
        "data-missing-field",
        "finetune.py",
        ft(),
        "no 'output' field",
        {"data.json": json.dumps([{"instruction": "a", "response": "b"}])},
    ),
    Case(
        "data-non-string-field",
        "finetune.py",
        ft(),
        "'output' is int",
        {"data.json": json.dumps([{"instruction": "a", "output": 5}])},
    ),
    Case("data-row-not-object", "finetune.py", ft(), "not an object", {"data.json": json.dumps(["just text"])}),
    Case("data-not-a-list", "finetune.py", ft(), "expected a JSON list", {"data.json": "42"}),
    Case(
        "data-empty-instruction",
        "finetune.py",
        ft(),
        "empty instruction",
        {"data.json": json.dumps(ROWS + [{"instruction": "  ", "output": "b"}])},
    ),
    Case(
        "data-empty-output-fail",
        "finetune.py",
        ft("data.empty_output=fail"),
        "empty output",
        {"data.json": json.dumps(ROWS + [{"instruction": "a", "output": ""}])},
    ),
    Case(
        "data-all-outputs-empty",
        "finetune.py",
        ft(),
        "no usable rows",
        {"data.json": json.dumps([{"instruction": f"q{i}", "output": ""} for i in range(5)])},
    ),
    Case("data-only-duplicates", "finetune.py", ft(), "duplicate", {"data.json": json.dumps([ROWS[0]] * 20)}),
    Case(
        "data-too-long-fail",
        "finetune.py",
        ft("data.too_long=fail"),
        "longer than data.max_length",
        {"data.json": json.dumps(ROWS + [{"instruction": "Repeat.", "output": LONG}])},
    ),
    Case("data-empty-file", "finetune.py", ft(), "empty", {"data.json": ""}),
    Case("data-missing-file", "finetune.py", ft(data="{tmp}/nope.json"), "not found"),
    Case("data-unsupported-extension", "finetune.py", ft(data="{tmp}/d.txt"), "unsupported extension", {"d.txt": "hi"}),
    Case(
        "data-dataset-stage-malformed",
        "dataset.py",
        ft(data="{tmp}/d.jsonl"),
        "line 2",
        {"d.jsonl": GOOD_JSONL.split("\n", 1)[0] + "\nnot json\n"},
    ),
    # -- conversations ---------------------------------------------------------------------------------
    Case(
        "conv-not-alternating",
        "finetune.py",
        ft(data="{tmp}/c.jsonl"),
        "line 33 turn 2 is user where assistant was expected",
        {"c.jsonl": conv_with({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})},
    ),
    Case(
        "conv-unknown-role",
        "dataset.py",
        ft(data="{tmp}/c.jsonl"),
        "line 33 turn 1 has an unknown role 'function'",
        {"c.jsonl": conv_with({"messages": [{"role": "function", "content": "{}"}]})},
    ),
    Case(
        "conv-tool-call-template-without-tools",
        "dataset.py",
        ft(data="{tmp}/c.jsonl"),
        "the rows have tool calls but the chat template does not render them; use a template that does",
        {"c.jsonl": conv_with({"messages": TOOL_CALL_TURNS})},
    ),
    Case(
        "conv-tool-output-without-a-call",
        "dataset.py",
        ft(data="{tmp}/c.jsonl"),
        "line 33 turn 2 is tool where assistant was expected",
        {"c.jsonl": conv_with({"messages": [TOOL_CALL_TURNS[0], *TOOL_CALL_TURNS[2:]]})},
    ),
    Case(
        "conv-empty-assistant-turn",
        "finetune.py",
        ft(data="{tmp}/c.jsonl"),
        "line 33 has an empty assistant turn",
        {"c.jsonl": conv_with({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]})},
    ),
    Case(
        "conv-messages-row-in-alpaca-file",
        "finetune.py",
        ft(data="{tmp}/d.jsonl"),
        "line 33 is a messages row in a file read as Alpaca",
        {"d.jsonl": GOOD_JSONL + json.dumps(CONV[0]) + "\n"},
    ),
    Case(
        "conv-sharegpt-unknown-role",
        "finetune.py",
        ft("data.format=sharegpt", data="{tmp}/s.jsonl"),
        "line 1 turn 2 has an unknown role 'function'",
        {
            "s.jsonl": json.dumps(
                {"conversations": [{"from": "human", "value": "a"}, {"from": "function", "value": "b"}]}
            )
        },
    ),
    Case(
        "conv-columns-name-a-missing-field",
        "finetune.py",
        ft("data.columns={{messages: dialog}}", data="{tmp}/c.jsonl"),
        "line 1 has no 'dialog' field, which data.columns maps to messages",
        {"c.jsonl": CONV_JSONL},
    ),
    Case(
        "conv-columns-unknown-key",
        "finetune.py",
        ft("data.columns={{instrution: question}}"),
        "did you mean 'instruction'",
        GOOD,
    ),
    Case(
        "conv-alpaca-columns-missing-field",
        "dataset.py",
        ft("data.columns={{instruction: question, output: answer}}"),
        "no 'question' field, which data.columns maps to instruction",
        GOOD,
    ),
    Case("conv-template-name-typo", "finetune.py", ft("data.prompt_template=lama3"), "did you mean 'llama3'", GOOD),
    Case(
        "conv-template-file-missing",
        "finetune.py",
        ft("data.prompt_template={tmp}/none.jinja", data="{tmp}/c.jsonl"),
        "not found",
        {"c.jsonl": CONV_JSONL},
    ),
    Case(
        "conv-template-cannot-render-system",
        "finetune.py",
        ft("data.prompt_template={tmp}/t.jinja", "data.system_prompt='Be brief'", data="{tmp}/c.jsonl"),
        "cannot render a system/user conversation",
        {"c.jsonl": CONV_JSONL, "t.jinja": SYSTEM_REFUSING_TEMPLATE},
    ),
    Case(
        "conv-mix-entry-unknown-key",
        "finetune.py",
        ft("data.path=[{{path: {tmp}/c.jsonl, wieght: 2}}]"),
        "data.path entry 1: a data.path entry has an unknown key 'wieght'; did you mean 'weight'?",
        {"c.jsonl": CONV_JSONL},
    ),
    Case(
        "conv-mix-entry-bad-row",
        "dataset.py",
        ft("data.path=[{tmp}/data.json, {tmp}/c.jsonl]"),
        "c.jsonl: line 33 turn 1 has an unknown role 'function'",
        {**GOOD, "c.jsonl": conv_with({"messages": [{"role": "function", "content": "{}"}]})},
    ),
    Case(
        "conv-format-undetectable",
        "dataset.py",
        ft(data="{tmp}/c.jsonl"),
        "cannot tell the format",
        {"c.jsonl": json.dumps({"prompt": "a", "completion": "b"}) + "\n"},
    ),
    # -- model -----------------------------------------------------------------------------------------
    Case("model-missing-path", "finetune.py", ft("model.name_or_path={tmp}/no-model"), "does not exist", GOOD),
    Case(
        "model-folder-without-config",
        "finetune.py",
        ft("model.name_or_path={tmp}/empty-model"),
        "no config.json",
        {**GOOD, "empty-model/README.md": "nothing here"},
    ),
    Case(
        "model-hub-unreachable",
        "finetune.py",
        ft("model.name_or_path=meta-llama/Meta-Llama-3-8B"),
        "unreachable",
        GOOD,
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{tmp}/hf"},
        unset=("HF_HUB_OFFLINE",),
        max_s=30,
    ),
    Case(
        "model-hub-offline-not-cached",
        "finetune.py",
        ft("model.name_or_path=meta-llama/Meta-Llama-3-8B"),
        "HF_HUB_OFFLINE",
        GOOD,
        env={"HF_HOME": "{tmp}/hf"},
        max_s=30,
    ),
    Case("model-not-causal-lm", "finetune.py", ft("model.name_or_path={bert}"), "not a causal language model", GOOD),
    Case("model-pickle-only", "finetune.py", ft("model.name_or_path={pickle}"), "pickle", GOOD),
    Case(
        "model-unknown-target-modules",
        "finetune.py",
        ft("lora.target_modules=[q_proj,query_key_value]"),
        "query_key_value",
        GOOD,
    ),
    Case(
        "model-gguf-package-missing",
        "finetune.py",
        ft("model.name_or_path={tmp}/conv", "model.gguf_source=no_such_pkg/model.gguf"),
        "not installed",
        GOOD,
    ),
    # -- merge -----------------------------------------------------------------------------------------
    Case(
        "merge-adapter-from-another-base",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "model.name_or_path={other}"],
        "trained on",
    ),
    Case(
        "merge-adapter-shape-mismatch",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "model.name_or_path={same_name}"],
        "does not fit",
    ),
    Case(
        "merge-missing-adapter-files",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "{hide_adapter}"],
        "not a complete adapter",
    ),
    Case("merge-dtype-4bit", "merge_adapter.py", ["--config", "{run}/config.yaml", "merge.dtype=nf4"], "4-bit"),
    Case(
        "merge-into-prequantized-base",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "model.name_or_path={quant4}"],
        "bitsandbytes checkpoint",
    ),
    Case(
        "merge-check-fails-writes-nothing",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "merge.max_logit_diff=1e-30", "merge.compute_dtype=bfloat16"],
        "nothing was written",
    ),
    Case(
        "evaluate-lm-eval-not-installed",
        "evaluate.py",
        ["--config", "{run}/config.yaml", "--lm-eval"],
        "pip install lm_eval",
        # A harness that does not import, as a missing dependency leaves it: shadowed on PYTHONPATH.
        {"hide/lm_eval/__init__.py": "raise ImportError('No module named lm_eval')\n"},
        env={"PYTHONPATH": "{tmp}/hide"},
    ),
    Case("merge-no-recent-run", "merge_adapter.py", [], "no recent run"),
    # -- inference -------------------------------------------------------------------------------------
    Case("infer-empty-prompt", "inference.py", ["--config", "{run}/config.yaml", "--adapter", "--prompt", ""], "empty"),
    Case(
        "infer-blank-prompt",
        "inference.py",
        ["--config", "{run}/config.yaml", "--adapter", "--prompt", "  \n "],
        "empty",
    ),
    Case(
        "infer-prompt-longer-than-context",
        "inference.py",
        ["--config", "{run}/config.yaml", "--adapter", "--prompt", LONG + " " + LONG],
        "context",
    ),
    Case(
        "infer-temperature-zero",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.temperature=0"],
        "inference.temperature",
    ),
    Case(
        "infer-top-p-above-one",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.top_p=1.5"],
        "inference.top_p",
    ),
    Case(
        "infer-top-k-negative",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.top_k=-1"],
        "inference.top_k",
    ),
    Case(
        "infer-max-new-tokens-zero",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.max_new_tokens=0"],
        "inference.max_new_tokens",
    ),
    Case("infer-no-prompt", "inference.py", ["--config", "{run}/config.yaml"], "--prompt"),
    Case("infer-compare-negative", "inference.py", ["--config", "{run}/config.yaml", "--compare", "-3"], "1 or more"),
    Case(
        "infer-compare-base",
        "inference.py",
        ["--config", "{run}/config.yaml", "--compare", "2", "--base"],
        "drop --base",
    ),
    Case(
        "infer-compare-cut-held-out-rows",
        "inference.py",
        ["--config", "{tmp}/run/config.yaml", "--compare", "2"],
        "line 2",
        setup="run-cut-eval-rows",
    ),
    Case(
        "infer-merged-missing",
        "inference.py",
        ["--config", "{run}/config.yaml", "--merged", "--prompt", "hi"],
        "no merged model",
    ),
    # -- issue 13: library-checked options, non-finite numbers, paths, YAML -----------------------------
    Case(
        "config-optim-typo", "finetune.py", ft("train.optim=adamw_troch"), "did you mean 'adamw_torch'", GOOD, max_s=60
    ),
    Case("config-scheduler-typo", "finetune.py", ft("train.lr_scheduler_type=cosin"), "train.lr_scheduler_type", GOOD),
    Case("config-report-to-unknown", "finetune.py", ft("train.report_to=wandbb"), "train.report_to", GOOD),
    Case("config-report-to-not-installed", "finetune.py", ft("train.report_to=wandb"), "'wandb' package", GOOD),
    Case(
        "config-report-to-list-not-installed",
        "finetune.py",
        ft("--train.report_to", "[tensorboard, mlflow]"),
        "'mlflow' package",
        GOOD,
    ),
    Case("config-report-to-none-and-more", "finetune.py", ft("train.report_to=none,tensorboard"), "use it alone", GOOD),
    Case(
        "config-flash-attn-not-installed",
        "finetune.py",
        ft("model.attn_implementation=flash_attention_2"),
        "flash_attn",
        GOOD,
    ),
    Case(
        "config-attn-wrong-case",
        "finetune.py",
        ft("model.attn_implementation=SDPA"),
        "did you mean 'sdpa'?",
        GOOD,
    ),
    Case(
        "config-attn-unknown",
        "finetune.py",
        ft("model.attn_implementation=flash2"),
        "model.attn_implementation='flash2' is not a value transformers accepts",
        GOOD,
    ),
    Case(  # transformers >= 5.25 installs 'kernels'; without it the error names the package instead
        "config-attn-hub-kernel-offline",
        "finetune.py",
        ft("model.attn_implementation=kernels-community/flash-attn2"),
        "'kernels-community/flash-attn2' is not in the local cache" if find_spec("kernels") else "'kernels' package",
        GOOD,
    ),
    Case(
        "merge-attn-unknown",
        "merge_adapter.py",
        ["--config", "{run}/config.yaml", "--model.attn_implementation", "sdpa_varlen"],
        "model.attn_implementation='sdpa_varlen'",
    ),
    Case(
        "infer-attn-flash-not-installed",
        "inference.py",
        ["--config", "{run}/config.yaml", "--adapter", "--prompt", "hi", "model.attn_implementation=flash_attention_3"],
        "flash_attn_interface",
    ),
    Case("lora-init-loftq", "finetune.py", ft("lora.init_lora_weights=loftq"), "LoftQ replaces the base", GOOD),
    Case("lora-init-eva", "finetune.py", ft("lora.init_lora_weights=eva"), "not supported here", GOOD),
    Case("lora-init-unknown", "finetune.py", ft("lora.init_lora_weights=pisa"), "not one of PEFT's", GOOD),
    Case("lora-init-pissa-4bit", "finetune.py", ft("lora.init_lora_weights=pissa"), "quant.load_in_4bit=false", GOOD),
    Case(
        "lora-init-orthogonal-odd-rank",
        "finetune.py",
        ft("lora.init_lora_weights=orthogonal", "lora.r=15"),
        "even lora.r",
        GOOD,
    ),
    Case("lora-modules-to-save-unknown", "finetune.py", ft("--lora.modules_to_save", "[lm_haed]"), "lm_haed", GOOD),
    Case("config-lr-inf", "finetune.py", ft("train.learning_rate=.inf"), "train.learning_rate", GOOD),
    Case("config-lr-nan", "finetune.py", ft("train.learning_rate=.nan"), "train.learning_rate", GOOD),
    Case(
        "config-epochs-inf",
        "finetune.py",
        ft("train.max_steps=-1", "train.num_train_epochs=.inf"),
        "train.num_train_epochs",
        GOOD,
    ),
    Case("config-grad-norm-inf", "finetune.py", ft("train.max_grad_norm=.inf"), "train.max_grad_norm", GOOD),
    Case("config-lora-alpha-nan", "finetune.py", ft("lora.lora_alpha=.nan"), "lora.lora_alpha", GOOD),
    Case("config-max-steps-zero", "finetune.py", ft("train.max_steps=0"), "train.max_steps=0", GOOD),
    Case(
        "config-duplicate-key",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "duplicate key 'learning_rate'",
        {"c.yaml": "train:\n  learning_rate: 1e-4\n  max_steps: 3\n  learning_rate: 1e-2\n"},
    ),
    Case(
        "config-alias-bomb",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "train.optim",
        {"c.yaml": "train:\n  optim: " + ALIAS_BOMB + "\n"},
        max_s=10,
    ),
    Case("config-output-dir-name-too-long", "finetune.py", ft("paths.output_dir={tmp}/" + "r" * 300), "bytes", GOOD),
    Case("config-is-a-folder", "finetune.py", ["--config", "{tmp}"], "is a folder"),
    Case("eval-size-fractional-count", "finetune.py", ft("data.eval_size=1.5"), "write 0.015 for 1.5% of the rows"),
    Case(
        "columns-mapping-without-spaces",
        "finetune.py",
        ft("data.columns={{instruction:question,output:answer}}"),
        "write data.columns='{instruction: question, output: answer}'",
    ),
    Case(
        "config-override-duplicate-key", "finetune.py", ft("lora.target_modules={{a: 1, a: 2}}"), "duplicate key", GOOD
    ),
    # -- issue 13: what --overwrite and a new run may replace -----------------------------------------
    Case(
        "overwrite-data-folder",
        "finetune.py",
        ft("paths.output_dir={tmp}/mydata", "--overwrite"),
        "does not hold a run",
        {**GOOD, "mydata/alpaca.json": GOOD_JSON, "mydata/make_data.py": "print(1)\n"},
    ),
    # A folder of the user's whose files merely share a run's names (no config.yaml written by finetune.py).
    Case(
        "new-run-in-folder-with-users-config",
        "finetune.py",
        ft("paths.output_dir={tmp}/mine"),
        "already holds adapter, config.yaml, which no stage wrote",
        {**GOOD, "mine/config.yaml": "my own settings\n", "mine/adapter/notes.txt": "x"},
    ),
    Case(
        "overwrite-folder-with-users-config",
        "finetune.py",
        ft("paths.output_dir={tmp}/mine", "--overwrite"),
        "config.yaml",
        {**GOOD, "mine/config.yaml": "my own settings\n"},
    ),
    Case("overwrite-dot", "finetune.py", ft("paths.output_dir=.", "--overwrite"), "working directory", GOOD),
    Case(
        "overwrite-parent-of-cwd",
        "finetune.py",
        ft("paths.output_dir=..", "--overwrite"),
        "holds the working directory",
        GOOD,
    ),
    Case("overwrite-repository-root", "finetune.py", ft(f"paths.output_dir={REPO}", "--overwrite"), "repository", GOOD),
    Case("overwrite-run-holding-user-files", "finetune.py", ft("--overwrite"), "notes.txt", GOOD, setup="run-notes"),
    Case(
        "new-run-into-user-folder",
        "finetune.py",
        ft("paths.output_dir={tmp}/mydata"),
        "already holds",
        {**GOOD, "mydata/alpaca.json": GOOD_JSON},
    ),
    Case("new-run-into-dot", "finetune.py", ft("paths.output_dir={tmp}"), "already holds", GOOD),
    Case(
        "new-run-into-tilde-home",
        "finetune.py",
        ft("paths.output_dir=~"),
        "already holds",
        {**GOOD, "home/.bashrc": "export A=1\n"},
        env={"HOME": "{tmp}/home"},
    ),
    Case(
        "overwrite-tilde-home",
        "finetune.py",
        ft("paths.output_dir=~/", "--overwrite"),
        "home folder",
        {**GOOD, "home/.bashrc": "export A=1\n"},
        env={"HOME": "{tmp}/home"},
    ),
    Case(
        "config-latest-is-user-file",
        "finetune.py",
        ft("paths.latest={tmp}/notes.txt"),
        "not a pointer",
        {**GOOD, "notes.txt": "line one\nline two\n"},
    ),
    Case("config-latest-is-a-folder", "finetune.py", ft("paths.latest={tmp}/d"), "is a folder", {**GOOD, "d/x": "x"}),
    Case(
        "dataset-stage-report-is-users",
        "dataset.py",
        ft("paths.output_dir={tmp}/mine"),
        "not written by dataset.py",
        {**GOOD, "mine/dataset_report.json": '{"mine": true}'},
    ),
    # -- issue 13: --resume checks before anything is written -----------------------------------------
    Case("resume-changed-lora-r", "finetune.py", ft("lora.r=4", "--resume"), "lora.r (saved", GOOD, setup="run"),
    Case(
        "resume-changed-method",
        "finetune.py",
        ft("train.method=dpo", "--resume"),
        "train.method (saved 'sft', now 'dpo')",
        GOOD,
        setup="run",
    ),
    Case(
        "resume-changed-targets",
        "finetune.py",
        ft("lora.target_modules=[q_proj]", "--resume"),
        "lora.target_modules",
        GOOD,
        setup="run",
    ),
    Case(
        "resume-changed-template",
        "finetune.py",
        ft("data.prompt_template=alpaca", "--resume"),
        "data.prompt_template",
        GOOD,
        setup="run",
    ),
    Case(
        "resume-changed-data",
        "finetune.py",
        ft("--resume"),
        "changed since the run started",
        {"data.json": json.dumps(ROWS[::-1])},
        setup="run",
    ),
    Case(
        "resume-changed-model",
        "finetune.py",
        ft("model.name_or_path={other}", "--resume"),
        "model.name_or_path",
        GOOD,
        setup="run",
    ),
    Case(
        "resume-finished-run", "finetune.py", ft("train.max_steps=2", "--resume"), "already reached", GOOD, setup="run"
    ),
    Case(
        "resume-auto-finished-run",
        "finetune.py",
        ft("train.max_steps=2", "train.resume=auto"),
        "already reached",
        GOOD,
        setup="run",
    ),
    # -- issue 13: data ------------------------------------------------------------------------------
    Case(
        "data-null-instruction",
        "finetune.py",
        ft(),
        "'instruction' is null",
        {"data.json": json.dumps(ROWS + [{"instruction": None, "output": "b"}])},
    ),
    Case(
        "data-null-output",
        "finetune.py",
        ft(),
        "'output' is null",
        {"data.json": json.dumps(ROWS + [{"instruction": "a", "output": None}])},
    ),
    Case(
        "data-jsonl-error-names-the-line",
        "finetune.py",
        ft(data="{tmp}/d.jsonl"),
        "line 5 has no 'output'",
        {
            "d.jsonl": GOOD_JSONL.split("\n", 1)[0]
            + "\n\n\n"
            + GOOD_JSONL.split("\n", 2)[1]
            + '\n{"instruction": "x"}\n'
        },
    ),
    Case(
        "data-jsonl-several-bad-lines",
        "finetune.py",
        ft(data="{tmp}/d.jsonl"),
        "line 3 is not valid JSON",
        {"d.jsonl": GOOD_JSONL.split("\n", 1)[0] + "\n\n{bad\n{worse\n"},
    ),
    Case("data-path-is-a-folder", "finetune.py", ft(data="{tmp}/d.json"), "is a folder", {"d.json/x.json": GOOD_JSON}),
    Case(
        "data-csv-error-names-the-line",
        "finetune.py",
        ft(data="{tmp}/d.csv"),
        "line 3",
        {"d.csv": "instruction,input,output\nAdd,2 and 3,5\n ,,x\n"},
    ),
    Case("dataset-stage-into-finished-run", "dataset.py", ft("paths.output_dir={run}"), "holds a training run", GOOD),
    Case(
        "dataset-stage-null-output",
        "dataset.py",
        ft(),
        "'output' is null",
        {"data.json": json.dumps([{"instruction": "a", "output": None}])},
    ),
    Case(
        "dataset-stage-output-dir-user-folder-remote",
        "dataset.py",
        ft("paths.output_dir={run}", "model.trust_remote_code=true"),
        "holds a training run",
        GOOD,
    ),
    # -- issue 13: models ----------------------------------------------------------------------------
    Case(
        "model-corrupt-safetensors",
        "finetune.py",
        ft("model.name_or_path={tmp}/model"),
        "cut off",
        GOOD,
        setup="corrupt-model",
    ),
    Case(
        "model-safetensors-header-garbage",
        "finetune.py",
        ft("model.name_or_path={tmp}/model"),
        "model.safetensors",
        GOOD,
        setup="garbage-model",
    ),
    # -- issue 13: merge -----------------------------------------------------------------------------
    Case(
        "merge-adapter-config-cut-off",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "cut off",
        setup="run-cut-adapter-config",
    ),
    Case(
        "merge-adapter-weights-cut-off",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "cut off",
        setup="run-cut-adapter-weights",
    ),
    Case(
        "merge-nan-adapter",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "non-finite",
        setup="run-nan-adapter",
    ),
    Case("merge-config-is-a-folder", "merge_adapter.py", ["--config", "{tmp}"], "is a folder"),
    Case(
        "merge-while-run-is-locked",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "in use by another",
        setup="run-locked",
    ),
    # -- issue 13: inference -------------------------------------------------------------------------
    Case(
        "infer-output-file-is-user-data",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/p.jsonl", "--output-file", "{tmp}/mydata.json"],
        "not an answer file",
        {"p.jsonl": '{"instruction": "hi"}\n', "mydata.json": GOOD_JSON},
    ),
    Case(
        "infer-output-file-is-user-jsonl",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/p.jsonl", "--output-file", "{tmp}/mine.jsonl"],
        "not an answer file",
        {"p.jsonl": '{"instruction": "hi"}\n', "mine.jsonl": GOOD_JSONL + '{"instr'},
    ),
    Case(
        "infer-nan-merged-model",
        "inference.py",
        ["--config", "{tmp}/run/config.yaml", "--merged", "--prompt", "hi"],
        "non-finite",
        setup="run-nan-merged",
    ),
    Case(
        "infer-nan-adapter",
        "inference.py",
        ["--config", "{tmp}/run/config.yaml", "--adapter", "--prompt", "hi"],
        "non-finite",
        setup="run-nan-adapter",
    ),
    Case(
        "infer-input-file-is-a-folder",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/d"],
        "is a folder",
        {"d/x.jsonl": "{}\n"},
    ),
    Case(
        "infer-input-file-not-utf8",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/p.jsonl"],
        "UTF-8",
        {"p.jsonl": b'{"instruction": "caf\xe9"}\n'},
    ),
    Case(
        "infer-input-file-malformed",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/p.jsonl"],
        "line 2 is not valid JSON",
        {"p.jsonl": '{"instruction": "hi"}\n{oops\n'},
    ),
    Case(
        "infer-empty-prompt-merged",
        "inference.py",
        ["--config", "{run}/config.yaml", "--merged", "--prompt", ""],
        "empty",
    ),
    Case("infer-empty-prompt-default", "inference.py", ["--config", "{run}/config.yaml", "--prompt", ""], "empty"),
    # -- issue 13: evaluate --------------------------------------------------------------------------
    Case(
        "eval-rows-not-utf8",
        "evaluate.py",
        ["--config", "{run}/config.yaml", "--rows", "{tmp}/r.jsonl"],
        "UTF-8",
        {"r.jsonl": b'{"instruction": "caf\xe9", "output": "x"}\n'},
    ),
    Case(
        "eval-rows-is-a-folder",
        "evaluate.py",
        ["--config", "{run}/config.yaml", "--rows", "{tmp}/r"],
        "is a folder",
        {"r/x.jsonl": "{}\n"},
    ),
    Case(
        "eval-rows-malformed",
        "evaluate.py",
        ["--config", "{run}/config.yaml", "--rows", "{tmp}/r.jsonl"],
        "line 2 is not valid JSON",
        {"r.jsonl": '{"instruction": "a", "output": "b"}\n{no\n'},
    ),
    Case(
        "eval-rows-null-output",
        "evaluate.py",
        ["--config", "{run}/config.yaml", "--rows", "{tmp}/r.jsonl"],
        "no reference answer",
        {"r.jsonl": '{"instruction": "a", "output": null}\n'},
    ),
    # -- issue 13: export ----------------------------------------------------------------------------
    Case(
        "export-outfile-is-user-file",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/mine.gguf"],
        "not a GGUF file",
        {"mine.gguf": "my notes\n"},
    ),
    Case(
        "export-modelfile-is-users",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/out/m.gguf"],
        "Modelfile",
        {"out/Modelfile": "FROM llama3\n"},
    ),
    Case(
        "export-outfile-is-a-folder",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/o.gguf"],
        "is a folder",
        {"o.gguf/x": "x"},
    ),
    Case(
        "export-corrupt-weights",
        "export_gguf.py",
        ["--model", "{tmp}/model", "--outfile", "{tmp}/m.gguf"],
        "corrupt",
        setup="garbage-model",
    ),
    Case("export-config-is-a-folder", "export_gguf.py", ["--config", "{tmp}"], "is a folder"),
    # -- issue 15: quantization types, the adapter GGUF, serving ---------------------------------------
    Case(
        "export-unknown-type",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/m.gguf", "--type", "q3_x"],
        "--type q3_x is not supported",
    ),
    Case(
        "export-kquant-without-llama-cpp",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/m.gguf", "--outtype", "Q4_K_M"],
        "make llama-cpp",
        {"hide/llama_cpp/__init__.py": "raise ImportError('llama_cpp hidden by the test')\n"},
        env={"PYTHONPATH": "{tmp}/hide"},
    ),
    Case(
        "export-kquant-outfile-is-user-file",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "{tmp}/mine.gguf", "--type", "q4_k_m"],
        "not a GGUF file",
        {"mine.gguf": "my notes\n"},
        llamacpp=True,
    ),
    Case(
        "export-adapter-kquant",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--adapter", "--type", "q4_k_m"],
        "--type q4_k_m is not supported; choose one of f32, f16, bf16, q8_0",
    ),
    Case(
        "export-adapter-and-model",
        "export_gguf.py",
        ["--model", "{model}", "--adapter", "--outfile", "{tmp}/a.gguf"],
        "pass one of them",
    ),
    Case(
        "export-adapter-dora",
        "export_gguf.py",
        ["--config", "{tmp}/run/config.yaml", "--adapter", "--outfile", "{tmp}/a.gguf"],
        "DoRA",
        setup="run-dora-adapter",
    ),
    Case(
        "export-adapter-missing",
        "export_gguf.py",
        ["--config", "{tmp}/run/config.yaml", "--adapter", "--outfile", "{tmp}/a.gguf"],
        "not a complete adapter",
        setup="run-no-adapter",
    ),
    Case(
        "export-outfile-not-writable",
        "export_gguf.py",
        ["--model", "{model}", "--outfile", "/proc/m.gguf"],
        "choose a writable --outfile",
    ),
    Case(
        "export-negative-calibration-rows",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--type", "q4_0", "--calibration-rows", "-5", "--outfile", "{tmp}/c.gguf"],
        "--calibration-rows -5 is negative",
    ),
    Case(
        "export-calibration-rows-not-a-number",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--type", "q4_0", "--calibration-rows", "all", "--outfile", "{tmp}/c.gguf"],
        "--calibration-rows",
    ),
    Case(
        "export-misspelt-flag",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--type", "q4_0", "--calibration_rows", "5", "--outfile", "{tmp}/c.gguf"],
        "did you mean --calibration-rows?",
    ),
    Case(
        "export-base-and-model",
        "export_gguf.py",
        ["--model", "{model}", "--base", "--outfile", "{tmp}/b.gguf"],
        "--base and --model pick different things to export",
    ),
    Case(
        "export-base-and-adapter",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--base", "--adapter"],
        "--adapter and --base pick different things to export",
    ),
    Case(
        "export-base-unknown-type",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--base", "--type", "q4", "--outfile", "{tmp}/b.gguf"],
        "--type q4 is not supported",
    ),
    Case(
        "export-base-dora",
        "export_gguf.py",
        ["--config", "{tmp}/run/config.yaml", "--base", "--outfile", "{tmp}/b.gguf"],
        "DoRA",
        setup="run-dora-adapter",
    ),
    Case(
        "export-base-no-adapter",
        "export_gguf.py",
        ["--config", "{tmp}/run/config.yaml", "--base", "--outfile", "{tmp}/b.gguf"],
        "not a complete adapter",
        setup="run-no-adapter",
    ),
    Case(
        "export-base-model-gone",
        "export_gguf.py",
        ["--config", "{run}/config.yaml", "--base", "--outfile", "{tmp}/b.gguf", "model.name_or_path={tmp}/gone"],
        "does not exist",
    ),
    Case(
        "serve-not-a-gguf",
        "inference.py",
        ["--serve", "{tmp}/notes.gguf"],
        "not a GGUF file",
        {"notes.gguf": "x"},
        llamacpp=True,
    ),
    Case("serve-missing-file", "inference.py", ["--serve", "{tmp}/none.gguf"], "is not a file", llamacpp=True),
    Case(
        "serve-bad-port",
        "inference.py",
        ["--serve", "{tmp}/none.gguf", "--port", "70000"],
        "not a TCP port",
        llamacpp=True,
    ),
    Case(
        "serve-lora-without-serve",
        "inference.py",
        ["--config", "{run}/config.yaml", "--lora", "{tmp}/a.gguf", "--prompt", "hi"],
        "go with --serve",
    ),
    # a flag is checked the same way in both spellings (`--port 9000`, `--port=9000`)
    Case("serve-port-without-serve", "inference.py", ["--config", "{run}/config.yaml", "--port", "9000"], "go with"),
    Case(
        "serve-port-equals-without-serve", "inference.py", ["--config", "{run}/config.yaml", "--port=9000"], "go with"
    ),
    Case("serve-host-equals-without-serve", "inference.py", ["--config", "{run}/config.yaml", "--host=::"], "go with"),
    # no abbreviations: a prefix of a flag is refused and named, never taken for the flag
    Case("flag-abbreviated", "dataset.py", ["--config", str(REPO / "configs" / "demo.yaml"), "--debu"], "--debug?"),
    Case("flag-abbreviated-dry-run", "finetune.py", ft("--dry"), "did you mean --dry-run?", GOOD, max_s=60),
    Case("infer-flag-abbreviated", "inference.py", ["--config", "{run}/config.yaml", "--promp", "hi"], "--prompt?"),
    Case("export-flag-abbreviated", "export_gguf.py", ["--config", "{run}/config.yaml", "--typ", "q8_0"], "--type?"),
    Case(
        "serve-with-merged", "inference.py", ["--config", "{run}/config.yaml", "--serve", "--merged"], "serves a GGUF"
    ),
    Case(
        "serve-run-without-export",
        "inference.py",
        ["--config", "{run}/config.yaml", "--serve"],
        "no GGUF in",
        llamacpp=True,
    ),
    Case(
        "serve-gguf-cut-short",
        "inference.py",
        ["--serve", "{tmp}/m.gguf"],
        "not a readable GGUF file",
        {"m.gguf": b"GGUF" + bytes(60)},
        llamacpp=True,
    ),
    # -- issue 13: quantization_utils ----------------------------------------------------------------
    Case(
        "quant-list-modules-missing-model",
        "quantization_utils.py",
        [
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "model.name_or_path={tmp}/nope",
            "model.gguf_source=null",
            "--list-modules",
        ],
        "does not exist",
    ),
    Case(
        "quant-config-duplicate-key",
        "quantization_utils.py",
        ["--config", "{tmp}/c.yaml"],
        "duplicate key",
        {"c.yaml": "quant:\n  load_in_4bit: true\n  load_in_4bit: false\n"},
    ),
    # -- issue 24: trust round 4 ---------------------------------------------------------------------
    Case(
        "packing-rows-longer-than-a-pack",
        "finetune.py",
        ft("train.packing=true", "train.pack_tokens=64", "data.max_length=256"),
        "shorter than",
        {"data.json": json.dumps([dict(r, output=(r["output"] + " ") * 6) for r in ROWS])},
    ),
    *(
        Case(f"dry-run-{key.split('.')[1]}", "finetune.py", ft(f"{key}={value}", "--dry-run"), key, GOOD)
        for key, value in [
            ("train.optim", "adamw_torhc"),
            ("train.lr_scheduler_type", "cosin"),
            ("train.report_to", "wandb"),
            ("model.attn_implementation", "sdpaa"),
            ("train.per_device_train_batch_size", 10**18),
            ("train.gradient_accumulation_steps", 10**18),
            ("data.max_length", 10**12),
            ("train.learning_rate", 1e300),
            ("train.seed", 10**23),
            ("train.warmup_steps", 1e300),
        ]
    ),
    Case(
        "dry-run-best-checkpoint-not-saved",
        "finetune.py",
        ft("train.load_best_model_at_end=true", "train.save_steps=3", "--dry-run"),
        "must be a multiple of train.eval_steps",
        GOOD,
    ),
    Case("source-weight-huge", "finetune.py", ft("data.path=[{{path: {tmp}/data.json, weight: 1e9}}]"), "weight", GOOD),
    Case("output-dir-newline", "finetune.py", ft("paths.output_dir={tmp}/a\nb"), "control character", GOOD),
    Case(
        "output-dir-tab-dry-run",
        "finetune.py",
        ft("paths.output_dir={tmp}/a\tb", "--dry-run"),
        "paths.output_dir",
        GOOD,
    ),
    Case(
        "columns-two-fields-one-column",
        "dataset.py",
        ft("data.columns={{instruction: output, output: output}}"),
        "maps both instruction and output to the column 'output'",
        GOOD,
    ),
    Case("output-dir-name-leaves-no-room", "finetune.py", ft("paths.output_dir={tmp}/" + "x" * 245), "at most", GOOD),
    Case(
        "output-dir-path-too-long",
        "dataset.py",
        ft("paths.output_dir={tmp}/" + "/".join(["y" * 200] * 20)),
        "as a full path",
        GOOD,
    ),
    Case(
        "prompt-not-utf8", "inference.py", ["--config", "{run}/config.yaml", "--prompt", "caf\udcff"], "--prompt holds"
    ),
    Case(
        "input-not-utf8",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "x", "--input", "\udcff"],
        "--input",
    ),
    Case(
        "prompt-file-lone-surrogate",
        "inference.py",
        ["--config", "{run}/config.yaml", "--input-file", "{tmp}/p.jsonl"],
        "line 2 holds '\\ud83d'",
        {"p.jsonl": '{"instruction": "hi"}\n{"instruction": "cut \\ud83d"}\n'},
    ),
    Case(
        "data-lone-surrogate-jsonl",
        "dataset.py",
        ft(data="{tmp}/d.jsonl"),
        "line 33 holds",
        {"d.jsonl": GOOD_JSONL + '{"instruction": "x", "output": "cut \\udc00 here"}\n'},
    ),
    Case(
        "data-lone-surrogate-json",
        "finetune.py",
        ft(),
        "row 3 holds '\\ud800'",
        {"data.json": json.dumps([*ROWS[:2], dict(ROWS[2], output="\ud800"), *ROWS[3:]])},
    ),
    Case("config-not-utf8-override", "finetune.py", ft("data.system_prompt=a\udcff"), "data.system_prompt holds", GOOD),
    Case(
        "adapter-config-nested-deep",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "nested too deeply",
        setup="run-deep-adapter-config",
    ),
    Case("data-nested-deep", "dataset.py", ft(), "nested too deeply", {"data.json": "[" * 200_000 + "]" * 200_000}),
    Case(
        "config-nested-deep",
        "finetune.py",
        ["--config", "{tmp}/c.yaml"],
        "nested too deeply",
        {"c.yaml": "train: " + "[" * 100_000 + "]" * 100_000 + "\n"},
    ),
    Case(
        "template-syntax-error",
        "dataset.py",
        ft("data.prompt_template={tmp}/t.jinja"),
        "has a Jinja syntax error at line 1",
        {**GOOD, "t.jinja": "{% for m in messages %}{{ m['content'] }"},
    ),
    Case(
        "template-builds-gigabytes",
        "dataset.py",
        ft("data.prompt_template={tmp}/t.jinja"),
        "built a value of 1,000,000,000 items",
        {**GOOD, "t.jinja": "{% for m in messages %}{{ m['content'] * 1000000000 }}{% endfor %}"},
    ),
    Case(
        "template-writes-too-much",
        "dataset.py",
        ft("data.prompt_template={tmp}/t.jinja"),
        "wrote more than",
        {
            **GOOD,
            "t.jinja": "{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        },
        max_s=30,
    ),
    Case(
        "api-key-without-serve",
        "inference.py",
        ["--config", "{run}/config.yaml", "--prompt", "hi", "--api-key=k"],
        "--api-key go with --serve",
    ),
    Case(
        "merged-is-the-users-folder",
        "merge_adapter.py",
        ["--config", "{tmp}/run/config.yaml"],
        "without merge_check.json, which merge_adapter.py did not write",
        setup="run-users-merged",
    ),
    Case(
        "eval-is-the-users-file",
        "evaluate.py",
        ["--config", "{tmp}/run/config.yaml"],
        "is a file, which evaluate.py did not write",
        setup="run-users-eval",
    ),
    Case("data-is-a-device", "dataset.py", ft(data="/dev/zero"), "not a regular file", GOOD),
    Case(
        "conversations-without-turns",
        "dataset.py",
        ft(data="{tmp}/c.jsonl"),
        "no usable rows left (10 empty outputs or conversations",
        {"c.jsonl": (json.dumps({"messages": []}) + "\n") * 10},
    ),
    # -- preference tuning (train.method) ------------------------------------------------------------------------
    Case(
        "preference-file-to-sft",
        "finetune.py",
        ft(data="{tmp}/p.jsonl"),
        "line 1 is a preference row (chosen, input, instruction, rejected), and train.method=sft",
        {"p.jsonl": pairs_with(PAIRS[0])},
        max_s=10,
    ),
    Case(
        "sft-file-to-dpo",
        "finetune.py",
        ft("train.method=dpo"),
        "row 1 has no chosen/rejected answers (it has: input, instruction, output), and train.method=dpo",
        GOOD,
        max_s=10,
    ),
    Case(
        "sft-file-to-dpo-in-dataset-report",
        "dataset.py",
        ft("train.method=orpo", data="{tmp}/d.jsonl"),
        "line 1 has no chosen/rejected answers",
        {"d.jsonl": GOOD_JSONL},
    ),
    Case(
        "pair-missing-side",
        "finetune.py",
        ft("train.method=dpo", data="{tmp}/p.jsonl"),
        "p.jsonl: line 3 has no 'rejected' answer (a pair needs both sides)",
        {"p.jsonl": pairs_with({"instruction": "Add 1 and 1.", "input": "", "chosen": "2"}, at=3)},
    ),
    Case(
        "pair-null-side",
        "finetune.py",
        ft("train.method=simpo", data="{tmp}/p.jsonl"),
        "line 2 has no 'chosen' answer",
        {"p.jsonl": pairs_with({"instruction": "Add 1 and 1.", "input": "", "chosen": None, "rejected": "3"})},
    ),
    Case(
        "kto-label-not-boolean",
        "finetune.py",
        ft("train.method=kto", data="{tmp}/k.jsonl"),
        "line 2 has label 'yes'; KTO's label says whether the completion is desirable: write true or false",
        {
            "k.jsonl": "".join(
                json.dumps({"prompt": r["instruction"], "completion": r["output"], "label": lab}) + "\n"
                for r, lab in zip(ROWS, [True, "yes"] + [False] * 30)
            )
        },
    ),
    Case(
        "unpaired-rows-to-dpo",
        "finetune.py",
        ft("train.method=dpo", data="{tmp}/k.jsonl"),
        "is an unpaired row (prompt/completion/label), and train.method=dpo trains on pairs",
        {"k.jsonl": json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n"},
    ),
    Case(
        "pairs-all-equal",
        "finetune.py",
        ft("train.method=dpo", data="{tmp}/p.jsonl"),
        "chosen == rejected in every pair",
        {"p.jsonl": "".join(json.dumps(dict(r, rejected=r["chosen"])) + "\n" for r in PAIRS)},
    ),
    Case(
        "pairs-in-a-mix",
        "finetune.py",
        ft("train.method=dpo", "data.path=[{tmp}/p.jsonl,{tmp}/p.jsonl]"),
        "train.method=dpo reads one preference file",
        {"p.jsonl": pairs_with(PAIRS[0])},
    ),
    Case(
        "pairs-with-sft-columns",
        "dataset.py",
        ft("train.method=dpo", "data.columns={{output: answer}}", data="{tmp}/p.jsonl"),
        "data.columns renames the SFT fields (output)",
        {"p.jsonl": pairs_with(PAIRS[0])},
    ),
    Case(
        "method-option-of-another-method",
        "finetune.py",
        ft("train.method=dpo", "train.simpo_gamma=1.0"),
        "train.simpo_gamma applies to train.method=simpo, not dpo",
        GOOD,
    ),
    Case(
        "method-unknown-loss-type",
        "finetune.py",
        ft("train.method=dpo", "train.loss_type=sigmod"),
        "did you mean 'sigmoid'?",
        GOOD,
    ),
    Case(
        "method-unknown",
        "finetune.py",
        ft("train.method=ppo"),
        "train.method",
        GOOD,
    ),
    Case(
        "dpo-with-a-nonzero-lora-init",
        "finetune.py",
        ft("train.method=kto", "lora.init_lora_weights=gaussian"),
        "set lora.init_lora_weights=true",
        GOOD,
    ),
    Case(
        "dpo-with-packing",
        "finetune.py",
        ft("train.method=dpo", "train.packing=true"),
        "set train.packing=false",
        GOOD,
    ),
    # -- GRPO (train.method=grpo): rewards, checked before the run folder is written ------------------------------
    Case("grpo-reward-file-missing", "finetune.py", grpo("train.rewards=[{tmp}/nope.py:score]"), "reward file", GOOD),
    Case(
        "grpo-reward-function-missing",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "has no function score; it has: other",
        {**GOOD, "r.py": "def other(completions, **kw):\n    return [0.0] * len(completions)\n"},
    ),
    Case(
        "grpo-reward-file-does-not-import",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "importing",
        {**GOOD, "r.py": "import no_such_module_here\n"},
    ),
    Case(
        "grpo-reward-raises",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "reward r.score raised ZeroDivisionError",
        {**GOOD, "r.py": "def score(completions, **kw):\n    return [1 / 0 for c in completions]\n"},
    ),
    Case(
        "grpo-reward-wrong-count",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "returned 2 values for 1 completions",
        {**GOOD, "r.py": "def score(completions, **kw):\n    return [1.0, 0.0]\n"},
    ),
    Case(
        "grpo-reward-nan",
        "finetune.py",
        grpo("train.rewards=[exact_match,{tmp}/r.py:score]"),
        "reward r.score returned nan",
        {**GOOD, "r.py": "def score(completions, **kw):\n    return [float('nan')] * len(completions)\n"},
    ),
    Case(
        "grpo-reward-not-a-number",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "not a number",
        {**GOOD, "r.py": "def score(completions, **kw):\n    return ['good'] * len(completions)\n"},
    ),
    Case(
        "grpo-reward-returns-one-number",
        "finetune.py",
        grpo("train.rewards=[{tmp}/r.py:score]"),
        "not a list of numbers",
        {**GOOD, "r.py": "def score(completions, **kw):\n    return 1.0\n"},
    ),
    Case(
        "grpo-exact-match-without-an-answer",
        "finetune.py",
        grpo(data="{tmp}/c.jsonl"),
        "reward exact_match needs a reference answer",
        {"c.jsonl": CONV_JSONL + json.dumps({"messages": [{"role": "user", "content": "No answer here?"}]}) + "\n"},
    ),
    Case(
        "grpo-completion-longer-than-max-length",
        "finetune.py",
        grpo("train.max_completion_length=128"),
        "leaves no room for a prompt in data.max_length=128",
        GOOD,
    ),
    Case("grpo-groups-do-not-divide", "finetune.py", grpo("train.num_generations=3"), "do not divide", GOOD),
    Case(
        "grpo-option-with-sft",
        "finetune.py",
        ft("train.num_generations=4"),
        "train.num_generations applies to train.method=grpo, not sft",
        GOOD,
    ),
    Case("grpo-unknown-reward", "finetune.py", grpo("train.rewards=[exact_mach]"), "did you mean 'exact_match'", GOOD),
    Case(
        "grpo-weights-count",
        "finetune.py",
        grpo("train.rewards=[exact_match,format]", "train.reward_weights=[1.0]"),
        "1 weights for 2 rewards",
        GOOD,
    ),
    Case(
        "grpo-best-checkpoint-without-a-loss",
        "finetune.py",
        grpo("train.eval_steps=2", "train.load_best_model_at_end=true"),
        "has no held-out loss to pick the best checkpoint by",
        GOOD,
    ),
    Case(
        "grpo-fewer-prompts-than-a-step",
        "finetune.py",
        grpo("train.per_device_train_batch_size=128"),
        "for each of 32 distinct prompts, and the training data holds 28",
        GOOD,
    ),
    Case("grpo-bad-regex", "finetune.py", grpo("train.reward_format_regex=(x"), "not a regular expression", GOOD),
    Case("grpo-vllm-on-cpu", "finetune.py", grpo("train.use_vllm=true"), "needs vLLM installed", GOOD),
    Case("grpo-unknown-loss", "finetune.py", grpo("train.loss_type=grpoo"), "did you mean 'grpo'", GOOD),
    Case(
        "grpo-on-pairs",
        "finetune.py",
        grpo(data="{tmp}/p.jsonl"),
        "train.method=grpo samples its own answers",
        {"p.jsonl": pairs_with(PAIRS[0])},
    ),
    Case(
        "grpo-kl-with-a-nonzero-lora-init",
        "finetune.py",
        grpo("train.beta=0.04", "lora.init_lora_weights=gaussian"),
        "set lora.init_lora_weights=true",
        GOOD,
    ),
    # -- model.adapter: training on from an earlier run's adapter --------------------------------------------------
    Case("start-adapter-missing", "finetune.py", ft("model.adapter={tmp}/no-run"), "model.adapter", GOOD),
    Case(
        "start-adapter-from-another-base",
        "finetune.py",
        ft("model.adapter={run}", "model.name_or_path={other}"),
        "set model.name_or_path to that base",
        GOOD,
    ),
    Case(
        "start-adapter-with-another-template",
        "finetune.py",
        ft("model.adapter={run}", "data.prompt_template=alpaca", "train.method=dpo", data="{tmp}/p.jsonl"),
        "set data.prompt_template=chat",
        {"p.jsonl": pairs_with(PAIRS[0])},
    ),
    Case(
        "start-adapter-is-a-file-dry-run",
        "finetune.py",
        ft("model.adapter={tmp}/data.json", "--dry-run"),
        "is a file, not a folder",
        GOOD,
    ),
    Case(
        "start-adapter-not-an-adapter",
        "finetune.py",
        ft("model.adapter={tmp}"),
        "is not a complete adapter",
        GOOD,
    ),
    Case(
        "conversations-user-only",
        "finetune.py",
        ft(data="{tmp}/c.jsonl"),
        "has an assistant turn to train",
        {"c.jsonl": "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(9))},
    ),
]


# -- fixtures: the models and the finished run the later stages read ---------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    bert = root / "tiny-bert"
    BertModel(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(bert)
    pickle = root / "pickle-only"
    pickle.mkdir()
    shutil.copy(tiny_llama / "config.json", pickle / "config.json")
    torch.save({"w": torch.zeros(1)}, pickle / "pytorch_model.bin")
    other = root / "other-llama"
    shutil.copytree(tiny_llama, other)
    # Same folder name as the trained-on base, different architecture: the names match, the shapes do not.
    same_name = root / "elsewhere" / tiny_llama.name
    cfg = LlamaConfig.from_pretrained(tiny_llama)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 32, 64, 2, 1
    LlamaForCausalLM(cfg).save_pretrained(same_name)
    shutil.copy(tiny_llama / "tokenizer.json", same_name / "tokenizer.json")
    shutil.copy(tiny_llama / "tokenizer_config.json", same_name / "tokenizer_config.json")
    quant4 = root / "q4" / tiny_llama.name
    shutil.copytree(tiny_llama, quant4)
    c = json.loads((quant4 / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quant4 / "config.json").write_text(json.dumps(c))
    return {
        "model": tiny_llama,
        "bert": bert,
        "pickle": pickle,
        "other": other,
        "same_name": same_name,
        "quant4": quant4,
    }


@pytest.fixture
def trained_run(tiny_run) -> Path:
    return tiny_run


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict:
    """Every file under root with a hash of its bytes: "unchanged" means byte for byte."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def nan_weights(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    save_file(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in t.items()},
        str(path),
        metadata={"format": "pt"},
    )


DEEP = 200_000
LOCK_HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()} test\\n'.encode())\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def prepare(setup: str, tmp: Path, trained_run: Path, models: dict) -> list:
    """The folder a case needs under tmp; returns processes to stop afterwards."""
    procs = []
    if setup.startswith("run"):
        run = copy_run(trained_run, tmp / "run")
        if setup == "run-notes":
            (run / "notes.txt").write_text("my notes\n")
        elif setup == "run-cut-adapter-config":
            p = run / "adapter" / "adapter_config.json"
            p.write_bytes(p.read_bytes()[:40])
        elif setup == "run-cut-adapter-weights":
            p = run / "adapter" / "adapter_model.safetensors"
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif setup == "run-cut-eval-rows":  # a held-out rows file cut off mid-line (a full disk, an editor)
            p = run / "eval_rows.jsonl"
            first = p.read_text().splitlines()[0]
            p.write_text(first + "\n" + first[: len(first) // 2] + "\n")
        elif setup == "run-users-merged":  # the user's folder where merge writes, in a run never merged
            (run / "merged").mkdir()
            (run / "merged" / "notes.txt").write_text("mine\n")
        elif setup == "run-users-eval":
            (run / "eval").write_text("mine\n")
        elif setup == "run-deep-adapter-config":  # valid JSON, nested past Python's recursion limit
            (run / "adapter" / "adapter_config.json").write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
        elif setup == "run-dora-adapter":
            p = run / "adapter" / "adapter_config.json"
            p.write_text(json.dumps(dict(json.loads(p.read_text()), use_dora=True)))
        elif setup == "run-no-adapter":
            shutil.rmtree(run / "adapter")
        elif setup == "run-nan-adapter":
            nan_weights(run / "adapter" / "adapter_model.safetensors")
        elif setup == "run-nan-merged":
            shutil.copytree(models["model"], run / "merged")
            nan_weights(run / "merged" / "model.safetensors")
        elif setup == "run-locked":
            pr = subprocess.Popen(
                [sys.executable, "-c", LOCK_HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True
            )
            assert pr.stdout.readline().strip() == "locked"
            procs.append(pr)
    elif setup in ("corrupt-model", "garbage-model"):
        m = tmp / "model"
        shutil.copytree(models["model"], m)
        w = m / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2] if setup == "corrupt-model" else b"garbage")
    return procs


# The first case of each stage runs as a real process.
AS_PROCESS = {next(c.id for c in CASES if c.script == script) for script in {c.script for c in CASES}}


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.llamacpp] if c.llamacpp else []) for c in CASES]
)
def test_bad_input(case: Case, tmp_path, models, trained_run):
    subst = {"tmp": str(tmp_path), "run": str(trained_run), **{k: str(v) for k, v in models.items()}}
    for name, content in case.files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    procs = prepare(case.setup, tmp_path, trained_run, models)
    args = [a.format(**subst) for a in case.args if a != "{hide_adapter}"]
    run = trained_run
    if "{hide_adapter}" in case.args:
        # A copy of the finished run whose adapter lost its weights file (as a copy cut short leaves it).
        run = copy_run(trained_run, tmp_path / "partial-run")
        (run / "adapter" / "adapter_model.safetensors").unlink()
        args = [a.replace(str(trained_run), str(run)) for a in args]
    before = snapshot(run)
    cwd = tmp_path / "cwd"  # an empty working folder: no runs/latest unless a case makes one
    cwd.mkdir()
    # The user's files and any prepared run: byte for byte the same afterwards, and nothing new beside them.
    before_tmp = snapshot(tmp_path, skip=("hf",))
    env = {k: v.format(**subst) for k, v in case.env.items()}
    t0 = time.time()
    try:
        # In this process (argv in; exit code and output out), except one case per stage that runs as its own
        # process, so that the exit code and the no-traceback contract are proven end to end.
        r = run_script(
            case.script, *args, cwd=cwd, env=env, unset=case.unset, timeout=300, process=case.id in AS_PROCESS
        )
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
    took = time.time() - t0
    err = r.stderr.strip()
    assert r.returncode == 2, f"exit {r.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert case.keyword in last, last
    if case.setup == "run-locked":
        assert f"pid {procs[0].pid}" in last, last
    if case.max_s:
        assert took < case.max_s, f"took {took:.0f}s"
    # Nothing half-written: no run folder from a failed training, the finished run and the user's files untouched.
    assert snapshot(tmp_path, skip=("hf",)) == before_tmp
    assert snapshot(run) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "script, args",
    [
        ("finetune.py", ["--config", "configs/demo.yaml", "train.learning_rat=1e-4"]),  # fails in the config
        ("inference.py", ["--config", "{run}/config.yaml", "--adapter", "--prompt", ""]),  # after the model loads
        ("quantization_utils.py", ["--config", "{run}/config.yaml", "--list-modules"]),  # succeeds
    ],
)
def test_in_process_runs_give_what_a_real_process_gives(script, args, trained_run, tmp_path):
    """The fast tier runs stages in the test process (helpers.run_script): the same exit code, the same last
    line, and nothing of the run left behind in this process (environment, folder, streams, handlers, lock)."""
    import logging
    import os
    import signal

    args = [a.format(run=trained_run) for a in args]
    state = lambda: (  # noqa: E731
        dict(os.environ),
        os.getcwd(),
        sys.stdout,
        sys.stderr,
        logging.getLogger().handlers[:],
        signal.getsignal(signal.SIGINT),
        signal.getsignal(signal.SIGTERM),
    )
    before = state()
    inside = run_script(script, *args, env={"FTKIT_TEST_MARK": "1"})
    assert state() == before
    real = run_script(script, *args, process=True)
    assert inside.returncode == real.returncode, (inside.stderr[-2000:], real.stderr[-2000:])
    last = lambda r: (r.stderr.strip().splitlines() or [""])[-1]  # noqa: E731
    if real.returncode:
        assert last(inside) == last(real) and last(real).startswith("error: ")
    else:
        assert inside.stdout == real.stdout and inside.stdout.strip()
    # The run's lock was released as a process exit releases it: a writer can take it now.
    from ftkit.runlock import RunLock

    with RunLock(trained_run, "test"):
        pass


def test_at_least_a_hundred_cases_across_every_stage():
    assert len(CASES) >= 100
    stages = {c.script for c in CASES}
    assert stages == {
        "finetune.py",
        "dataset.py",
        "merge_adapter.py",
        "inference.py",
        "evaluate.py",
        "export_gguf.py",
        "quantization_utils.py",
    }


@pytest.mark.parametrize("too_long, kept_long", [("drop", 0), ("truncate", 1)])
def test_rows_bad_only_in_part_follow_the_policy_and_are_counted(tmp_path, tiny_llama, too_long, kept_long):
    """Too long / empty output / duplicate rows: dropped (or truncated) by policy, never silently."""
    rows = ROWS + [
        {"instruction": "Repeat.", "input": "", "output": LONG},
        {"instruction": "Say nothing.", "input": "", "output": "   "},
        ROWS[0],
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    r = run_script(
        "dataset.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(tiny_llama, data, out, **{"data.too_long": too_long, "data.eval_size": 0}),
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["rows_in_file"] == len(rows) and rep["empty_output"] == 1 and rep["duplicates"] == 1
    assert rep["dropped_too_long"] == 1 - kept_long and rep["truncated"] == kept_long
    assert rep["train_rows"] == len(ROWS) + kept_long
    assert f"dropped as too long {1 - kept_long}" in r.stdout
