"""Bad input, table-driven, through the real scripts as a user runs them.

Every case must end with exit code 2, one line on stderr that starts with "error:" and names the problem
(a keyword), no traceback, and nothing half-written: the run directory of a failed training is absent, and
a finished run that merge/inference read is byte-for-byte unchanged (no merged/, no temporary folders).

The cheap cases fail before torch or a model is loaded (config and data: well under a second each); the
model, merge and inference cases load at most a config, a tokenizer or the tiny 3M-parameter model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, REPO, run_script, tiny_overrides

ROWS = [dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(4) for r in ALPACA_ROWS]
GOOD_JSON = json.dumps(ROWS)
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
LONG = " ".join(["word"] * 400)


@dataclass
class Case:
    id: str
    script: str
    args: list[str]            # placeholders: {tmp} {model} {run} {bert} {pickle} {other} {same_name} {quant4}
    keyword: str               # must appear in the one-line error
    files: dict = field(default_factory=dict)   # name under {tmp} -> str or bytes
    env: dict = field(default_factory=dict)
    unset: tuple = ()          # environment variables to remove
    max_s: float | None = None  # wall-clock bound, for the cases that must fail fast


def ft(*extra: str, data: str = "{tmp}/data.json") -> list[str]:
    """finetune.py on the tiny model with a good data file unless the case swaps it."""
    over = tiny_overrides(Path("{model}"), Path(data), Path("{tmp}/run"))
    return ["--config", str(REPO / "configs" / "demo.yaml"), *over, *extra]


def with_data(name: str, content) -> dict:
    return {name: content}


GOOD = {"data.json": GOOD_JSON}

CASES = [
    # -- config ----------------------------------------------------------------------------------------
    Case("config-invalid-yaml", "finetune.py", ["--config", "{tmp}/c.yaml"], "invalid YAML at line",
         {"c.yaml": "train:\n  max_steps: [1,\n"}),
    Case("config-not-utf8", "finetune.py", ["--config", "{tmp}/c.yaml"], "UTF-8", {"c.yaml": b"train:\n  seed: \xff\xfe\n"}),
    Case("config-top-level-list", "finetune.py", ["--config", "{tmp}/c.yaml"], "mapping of sections", {"c.yaml": "- a\n- b\n"}),
    Case("config-section-not-mapping", "finetune.py", ["--config", "{tmp}/c.yaml"], "must be a mapping",
         {"c.yaml": "lora: 5\n"}),
    Case("config-missing-file", "finetune.py", ["--config", "{tmp}/nope.yaml"], "not found"),
    Case("config-unknown-section", "finetune.py", ["--config", "{tmp}/c.yaml"], "unknown config section 'trian'",
         {"c.yaml": "trian:\n  max_steps: 3\n"}),
    Case("config-unknown-key", "finetune.py", ft("lora.rank=8"), "did you mean 'lora.r'", GOOD),
    Case("config-key-in-wrong-section", "finetune.py", ft("train.r=8"), "lora.r", GOOD),
    Case("config-wrong-type", "finetune.py", ft("lora.r=abc"), "lora.r", GOOD),
    Case("config-wrong-type-list", "finetune.py", ft("lora.target_modules=5"), "lora.target_modules", GOOD),
    Case("config-r-zero", "finetune.py", ft("lora.r=0"), "lora.r", GOOD),
    Case("config-negative-lr", "finetune.py", ft("train.learning_rate=-1e-4"), "train.learning_rate", GOOD),
    Case("config-dropout-one", "finetune.py", ft("lora.lora_dropout=1.0"), "lora.lora_dropout", GOOD),
    Case("config-max-length-tiny", "finetune.py", ft("data.max_length=8"), "data.max_length", GOOD),
    Case("config-override-not-key-value", "finetune.py", ft("max_steps"), "KEY=VALUE", GOOD),
    Case("config-4bit-and-8bit", "finetune.py", ft("quant.load_in_8bit=true"), "load_in_8bit", GOOD),
    Case("config-early-stopping-without-eval", "finetune.py",
         ft("train.eval_steps=null", "train.early_stopping_patience=2"), "eval_steps", GOOD),
    Case("config-overwrite-and-resume", "finetune.py", ft("--overwrite", "--resume"), "contradict", GOOD),
    Case("config-resume-without-run", "finetune.py", ft("--resume"), "no run to resume", GOOD),
    Case("config-eval-size-too-big", "finetune.py", ft("data.eval_size=1000"), "data.eval_size", GOOD),
    Case("config-output-dir-is-a-file", "finetune.py", ft("paths.output_dir={tmp}/afile"), "is a file",
         {**GOOD, "afile": "x"}),
    Case("config-output-dir-under-a-file", "finetune.py", ft("paths.output_dir={tmp}/afile/run"), "is a file",
         {**GOOD, "afile": "x"}),
    Case("config-fsdp-storage-mismatch", "finetune.py", ft(), "quant.bnb_4bit_quant_storage", GOOD,
         env={"ACCELERATE_USE_FSDP": "true"}),
    Case("config-fsdp-on-cpu", "finetune.py",
         ft("quant.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch"), "FSDP needs CUDA", GOOD,
         env={"ACCELERATE_USE_FSDP": "true"}),
    Case("config-max-length-below-prompt-fail", "finetune.py",
         ft("data.max_length=16", "data.too_long=fail"), "prompt alone exceeds data.max_length", GOOD),
    Case("config-max-length-below-prompt-drop", "finetune.py", ft("data.max_length=16"), "no training rows left", GOOD),
    Case("disk-too-small-for-checkpoints", "finetune.py",
         ft("train.max_steps=100000000", "train.save_steps=2", "train.save_total_limit=null"), "not enough disk space",
         GOOD),
    # -- data ------------------------------------------------------------------------------------------
    Case("data-malformed-json", "finetune.py", ft(), "line 3",
         {"data.json": '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'}),
    Case("data-malformed-jsonl", "finetune.py", ft(data="{tmp}/d.jsonl"), "line 3",
         {"d.jsonl": GOOD_JSONL.split("\n", 2)[0] + "\n" + GOOD_JSONL.split("\n", 2)[1] + "\n{broken\n"}),
    Case("data-malformed-csv", "finetune.py", ft(data="{tmp}/d.csv"), "line 3",
         {"d.csv": "instruction,input,output\nAdd,2 and 3,5\nName a color,,red,extra,cells\n"}),
    Case("data-csv-missing-column", "finetune.py", ft(data="{tmp}/d.csv"), "'output'",
         {"d.csv": "instruction,input\nAdd,2 and 3\n"}),
    Case("data-latin1-encoding", "finetune.py", ft(), "UTF-8",
         {"data.json": json.dumps([{"instruction": "caf\u00e9", "output": "x"}], ensure_ascii=False).encode("latin-1")}),
    Case("data-utf16-encoding", "finetune.py", ft(), "UTF-8", {"data.json": GOOD_JSON.encode("utf-16")}),
    Case("data-missing-field", "finetune.py", ft(), "no 'output' field",
         {"data.json": json.dumps([{"instruction": "a", "response": "b"}])}),
    Case("data-non-string-field", "finetune.py", ft(), "'output' is int",
         {"data.json": json.dumps([{"instruction": "a", "output": 5}])}),
    Case("data-row-not-object", "finetune.py", ft(), "not an object", {"data.json": json.dumps(["just text"])}),
    Case("data-not-a-list", "finetune.py", ft(), "expected a JSON list", {"data.json": "42"}),
    Case("data-empty-instruction", "finetune.py", ft(), "empty instruction",
         {"data.json": json.dumps(ROWS + [{"instruction": "  ", "output": "b"}])}),
    Case("data-empty-output-fail", "finetune.py", ft("data.empty_output=fail"), "empty output",
         {"data.json": json.dumps(ROWS + [{"instruction": "a", "output": ""}])}),
    Case("data-all-outputs-empty", "finetune.py", ft(), "no usable rows",
         {"data.json": json.dumps([{"instruction": f"q{i}", "output": ""} for i in range(5)])}),
    Case("data-only-duplicates", "finetune.py", ft(), "duplicate",
         {"data.json": json.dumps([ROWS[0]] * 20)}),
    Case("data-too-long-fail", "finetune.py", ft("data.too_long=fail"), "longer than data.max_length",
         {"data.json": json.dumps(ROWS + [{"instruction": "Repeat.", "output": LONG}])}),
    Case("data-empty-file", "finetune.py", ft(), "empty", {"data.json": ""}),
    Case("data-missing-file", "finetune.py", ft(data="{tmp}/nope.json"), "not found"),
    Case("data-unsupported-extension", "finetune.py", ft(data="{tmp}/d.txt"), "unsupported extension", {"d.txt": "hi"}),
    Case("data-dataset-stage-malformed", "dataset.py", ft(data="{tmp}/d.jsonl"), "line 2",
         {"d.jsonl": GOOD_JSONL.split("\n", 1)[0] + "\nnot json\n"}),
    # -- model -----------------------------------------------------------------------------------------
    Case("model-missing-path", "finetune.py", ft("model.name_or_path={tmp}/no-model"), "does not exist", GOOD),
    Case("model-folder-without-config", "finetune.py", ft("model.name_or_path={tmp}/empty-model"), "no config.json",
         {**GOOD, "empty-model/README.md": "nothing here"}),
    Case("model-hub-unreachable", "finetune.py", ft("model.name_or_path=meta-llama/Meta-Llama-3-8B"), "unreachable",
         GOOD, env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{tmp}/hf"}, unset=("HF_HUB_OFFLINE",), max_s=30),
    Case("model-hub-offline-not-cached", "finetune.py", ft("model.name_or_path=meta-llama/Meta-Llama-3-8B"),
         "HF_HUB_OFFLINE", GOOD, env={"HF_HOME": "{tmp}/hf"}, max_s=30),
    Case("model-not-causal-lm", "finetune.py", ft("model.name_or_path={bert}"), "not a causal language model", GOOD),
    Case("model-pickle-only", "finetune.py", ft("model.name_or_path={pickle}"), "pickle", GOOD),
    Case("model-unknown-target-modules", "finetune.py", ft("lora.target_modules=[q_proj,query_key_value]"),
         "query_key_value", GOOD),
    Case("model-gguf-package-missing", "finetune.py",
         ft("model.name_or_path={tmp}/conv", "model.gguf_source=no_such_pkg/model.gguf"), "not installed", GOOD),
    # -- merge -----------------------------------------------------------------------------------------
    Case("merge-adapter-from-another-base", "merge_adapter.py",
         ["--config", "{run}/config.yaml", "model.name_or_path={other}"], "trained on"),
    Case("merge-adapter-shape-mismatch", "merge_adapter.py",
         ["--config", "{run}/config.yaml", "model.name_or_path={same_name}"], "does not fit"),
    Case("merge-missing-adapter-files", "merge_adapter.py", ["--config", "{run}/config.yaml", "{hide_adapter}"],
         "not a complete adapter"),
    Case("merge-dtype-4bit", "merge_adapter.py", ["--config", "{run}/config.yaml", "merge.dtype=nf4"], "4-bit"),
    Case("merge-into-prequantized-base", "merge_adapter.py",
         ["--config", "{run}/config.yaml", "model.name_or_path={quant4}"], "bitsandbytes checkpoint"),
    Case("merge-check-fails-writes-nothing", "merge_adapter.py",
         ["--config", "{run}/config.yaml", "merge.max_logit_diff=1e-30", "merge.compute_dtype=bfloat16"],
         "nothing was written"),
    Case("merge-no-recent-run", "merge_adapter.py", [], "no recent run"),
    # -- inference -------------------------------------------------------------------------------------
    Case("infer-empty-prompt", "inference.py", ["--config", "{run}/config.yaml", "--adapter", "--prompt", ""], "empty"),
    Case("infer-blank-prompt", "inference.py", ["--config", "{run}/config.yaml", "--adapter", "--prompt", "  \n "],
         "empty"),
    Case("infer-prompt-longer-than-context", "inference.py",
         ["--config", "{run}/config.yaml", "--adapter", "--prompt", LONG + " " + LONG], "context"),
    Case("infer-temperature-zero", "inference.py",
         ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.temperature=0"], "inference.temperature"),
    Case("infer-top-p-above-one", "inference.py",
         ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.top_p=1.5"], "inference.top_p"),
    Case("infer-top-k-negative", "inference.py",
         ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.top_k=-1"], "inference.top_k"),
    Case("infer-max-new-tokens-zero", "inference.py",
         ["--config", "{run}/config.yaml", "--prompt", "hi", "inference.max_new_tokens=0"], "inference.max_new_tokens"),
    Case("infer-no-prompt", "inference.py", ["--config", "{run}/config.yaml"], "--prompt"),
    Case("infer-merged-missing", "inference.py", ["--config", "{run}/config.yaml", "--merged", "--prompt", "hi"],
         "no merged model"),
]


# -- fixtures: the models and the finished run the later stages read ---------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("models")
    bert = root / "tiny-bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(bert)
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
    return {"model": tiny_llama, "bert": bert, "pickle": pickle, "other": other, "same_name": same_name,
            "quant4": quant4}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("trained")
    data = root / "data.json"
    data.write_text(GOOD_JSON)
    run = root / "run"
    r = run_script("finetune.py", "--config", "configs/demo.yaml",
                   *tiny_overrides(tiny_llama, data, run, **{"train.max_steps": 2, "train.eval_steps": "null", "train.load_best_model_at_end": "false"}))
    assert r.returncode == 0, r.stderr
    return run


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, models, trained_run):
    subst = {"tmp": str(tmp_path), "run": str(trained_run), **{k: str(v) for k, v in models.items()}}
    for name, content in case.files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.format(**subst) for a in case.args if a != "{hide_adapter}"]
    run = trained_run
    if "{hide_adapter}" in case.args:
        # A copy of the finished run whose adapter lost its weights file (as a copy cut short leaves it).
        run = tmp_path / "partial-run"
        shutil.copytree(trained_run, run)
        (run / "adapter" / "adapter_model.safetensors").unlink()
        cfg = (run / "config.yaml").read_text().replace(str(trained_run), str(run))
        (run / "config.yaml").write_text(cfg)
        args = [a.replace(str(trained_run), str(run)) for a in args]
    before = snapshot(run)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               **{k: v.format(**subst) for k, v in case.env.items()})
    for k in case.unset:
        env.pop(k, None)
    cwd = tmp_path / "cwd"  # an empty working folder: no runs/latest unless a case makes one
    cwd.mkdir()
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / case.script), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    took = time.time() - t0
    err = r.stderr.strip()
    assert r.returncode == 2, f"exit {r.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert case.keyword in last, last
    if case.max_s:
        assert took < case.max_s, f"took {took:.0f}s"
    # Nothing half-written: no run folder from a failed training, the finished run untouched.
    assert not (tmp_path / "run").exists()
    assert snapshot(run) == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_at_least_forty_cases_across_every_stage():
    assert len(CASES) >= 40
    stages = {c.id.split("-")[0] for c in CASES}
    assert {"config", "data", "model", "merge", "infer"} <= stages


@pytest.mark.parametrize("too_long, kept_long", [("drop", 0), ("truncate", 1)])
def test_rows_bad_only_in_part_follow_the_policy_and_are_counted(tmp_path, tiny_llama, too_long, kept_long):
    """Too long / empty output / duplicate rows: dropped (or truncated) by policy, never silently."""
    rows = ROWS + [{"instruction": "Repeat.", "input": "", "output": LONG},
                   {"instruction": "Say nothing.", "input": "", "output": "   "}, ROWS[0]]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    r = run_script("dataset.py", "--config", "configs/demo.yaml",
                   *tiny_overrides(tiny_llama, data, out, **{"data.too_long": too_long, "data.eval_size": 0}))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["rows_in_file"] == len(rows) and rep["empty_output"] == 1 and rep["duplicates"] == 1
    assert rep["dropped_too_long"] == 1 - kept_long and rep["truncated"] == kept_long
    assert rep["train_rows"] == len(ROWS) + kept_long
    assert f"dropped as too long {1 - kept_long}" in r.stdout
