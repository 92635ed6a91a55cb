"""Preference tuning (train.method=dpo|kto|orpo|simpo): the data formats (ftkit/pairs.py), each method's tiny
chain finetune -> merge -> inference on the same run folder, and the report dataset.py writes for pairs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, run_script, tiny_overrides

from ftkit.config import DataCfg
from ftkit.errors import UserError
from ftkit.pairs import load_clean_split

# Pairs of the tiny Alpaca rows: the right answer against a wrong one (reversed text and a word more).
PAIRS = [
    {
        "instruction": f"{r['instruction']} (variant {k})",
        "input": r["input"],
        "chosen": r["output"],
        "rejected": f"{r['output'][::-1]} no",
    }
    for k in range(4)
    for r in ALPACA_ROWS
]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    p.write_text(jsonl(PAIRS))
    return p


def split(tmp_path: Path, rows: list, method: str = "dpo", **data) -> tuple:
    p = tmp_path / "d.jsonl"
    p.write_text(jsonl(rows))
    return load_clean_split(DataCfg(path=str(p), eval_size=0, **data), method)


# -- formats ---------------------------------------------------------------------------------------------------
USER = {"role": "user", "content": "Add 2 and 3."}
FORMATS = {
    "alpaca_preference": {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "6"},
    "preference": {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
    "preference-messages": {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
    "preference-implicit-prompt": {
        "chosen": [USER, {"role": "assistant", "content": "5"}],
        "rejected": [USER, {"role": "assistant", "content": "6"}],
    },
    "unpaired": {"prompt": "Add 2 and 3.", "completion": "5", "label": True},
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_is_detected_and_read_as_one_row_shape(name, tmp_path, caplog):
    row = FORMATS[name]
    # A second row: the other label, or another rejected answer ("7") to the same prompt.
    rows = [row, json.loads(json.dumps(row).replace('"6"', '"7"').replace("true", "false"))]
    method = "kto" if name == "unpaired" else "dpo"
    with caplog.at_level("INFO"):
        train, _, st, _ = split(tmp_path, rows, method, drop_duplicates=False)
    fmt = name.split("-")[0]
    assert st.format == fmt and f"reading {tmp_path / 'd.jsonl'} as {fmt} rows" in caplog.text
    first = train[0] if train[0]["prompt"][-1]["content"].startswith("Add") else train[1]
    assert first["prompt"][-1]["role"] == "user" and "2" in first["prompt"][-1]["content"]
    if name == "unpaired":
        assert {r["label"] for r in train} == {True, False} and {r["completion"] for r in train} == {"5"}
    else:
        assert {r["chosen"] for r in train} == {"5"} and {r["rejected"] for r in train} == {"6", "7"}


def test_equal_pairs_are_counted_and_dropped_with_a_warning(tmp_path, caplog):
    rows = [dict(FORMATS["preference"], prompt=f"q{i}") for i in range(3)]
    rows.append(dict(FORMATS["preference"], prompt="q3", rejected="5"))
    with caplog.at_level("WARNING"):
        train, _, st, _ = split(tmp_path, rows)
    assert st.equal_pairs == 1 and len(train) == 3 and "1 pair(s) whose chosen and rejected" in caplog.text


def test_kto_takes_pairs_and_dpo_refuses_unpaired_rows(tmp_path):
    train, _, st, _ = split(tmp_path, [FORMATS["preference"]], "kto")
    assert st.format == "preference" and train[0]["chosen"] == "5"
    with pytest.raises(UserError, match="line 1 is an unpaired row"):
        split(tmp_path, [FORMATS["unpaired"]], "orpo")


# -- each method, end to end -------------------------------------------------------------------------------------
METHODS = ["dpo", "kto", "orpo", "simpo"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_merges_and_answers_from_the_same_run_folder(method, tiny_llama, pair_file, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    over = {"train.method": method, "train.max_steps": 2, "train.eval_steps": "null", "train.report_to": "none"}
    t0 = time.time()
    r = run_script(
        "finetune.py", "--config", str(REPO / "configs/demo.yaml"), *tiny_overrides(tiny_llama, pair_file, run, **over)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["method"] == method and plan["padding_free"] is False
    assert (plan["reference"] is not None) == (method in ("dpo", "kto"))
    assert any(c["key"] == "train.padding_free" and method in c["reason"] for c in plan["changes"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2]
    if method in ("dpo", "kto"):
        # The reference is the policy with its adapter off, and a new adapter starts as no change: the first
        # step's rewards (log-ratios against the reference) are exactly zero. A second copy would not be.
        assert log[0]["rewards/chosen"] == 0 and (log[0].get("rewards/rejected", 0) == 0)
    # One adapter, trained (PEFT starts lora_B at zero), no "ref" copy beside it.
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    assert not any(".ref." in k for k in weights) and not (run / "adapter" / "ref").exists()
    # The stages after training read the run as they read an SFT run.
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff"] <= check["tolerance"]["max_logit_diff"] and check["max_logit_diff_from_base"] > 0
    r = run_script(
        "inference.py", "--config", str(run / "config.yaml"), "--prompt", "Add the numbers.", "--input", "2 and 3"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    if method == "dpo":  # evaluate.py too: the held-out pairs' preference accuracy, base vs tuned
        r = run_script("evaluate.py", "--config", str(run / "config.yaml"))
        assert r.returncode == 0, r.stderr[-3000:]
        rep = json.loads((run / "eval" / "eval_report.json").read_text())
        pref = rep["preference"]
        assert pref["pairs"] == 4 and "preference accuracy %" in r.stdout
        for name in ("base", "fine_tuned"):
            margins = [row[name]["margin"] for row in rep["rows"]]
            assert pref[name]["accuracy"] == 100 * sum(m > 0 for m in margins) / 4
            assert pref[name]["mean_margin"] == pytest.approx(sum(margins) / 4, abs=1e-3)
    assert time.time() - t0 < 120


def test_dpo_from_an_sft_adapter_compares_with_it_and_trains_on_from_it(tiny_llama, tiny_run, pair_file, tmp_path):
    """model.adapter: the SFT -> DPO pipeline. The reference is a frozen copy of the SFT adapter (TRL's "ref"
    adapter, kept): at step 1 the policy is that adapter, so DPO's rewards (log-ratios) are exactly 0, which they
    would not be against the bare base. Training goes on from the SFT weights, and adapter/ holds one adapter."""
    import hashlib

    from safetensors.torch import load_file

    def hashes(folder: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}

    before = hashes(tiny_run)
    run = tmp_path / "run"
    over = {
        "train.method": "dpo",
        "train.max_steps": 1,
        "train.eval_steps": "null",
        "train.report_to": "none",
        "train.learning_rate": 1e-6,
        "model.adapter": str(tiny_run),
    }
    r = run_script(
        "finetune.py", "--config", str(REPO / "configs/demo.yaml"), *tiny_overrides(tiny_llama, pair_file, run, **over)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.adapter: training on from" in r.stderr
    plan = json.loads((run / "plan.json").read_text())
    assert plan["reference"].startswith("a frozen copy of model.adapter")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["rewards/chosen"] == 0 and log[0]["rewards/rejected"] == 0
    start = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    end = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert set(start) == set(end) and not (run / "adapter" / "ref").exists()
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in start.items())
    assert max((end[k].float() - start[k].float()).abs().max().item() for k in start) < 1e-3
    assert hashes(tiny_run) == before  # the run trained on from is only read


def test_dataset_report_for_pairs(tiny_llama, tmp_path):
    rows = PAIRS + [
        dict(PAIRS[0], instruction="Same.", rejected=PAIRS[0]["chosen"]),
        dict(PAIRS[1], instruction="Long.", chosen=" ".join(["word"] * 300)),
    ]
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(rows))
    out = tmp_path / "report"
    over = {"train.method": "dpo", "data.eval_size": 0}
    r = run_script(
        "dataset.py", "--config", str(REPO / "configs/demo.yaml"), *tiny_overrides(tiny_llama, data, out, **over)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["format"] == "alpaca_preference" and rep["method"] == "dpo"
    assert rep["rows_in_file"] == len(rows) and rep["equal_pairs_dropped"] == 1
    assert rep["cut_at_max_length"] == 1 and rep["dropped_too_long"] == 1 and rep["train_rows"] == len(PAIRS)
    assert set(rep["mean_tokens"]) == {"prompt", "chosen", "rejected"}
    assert rep["mean_tokens"]["prompt"] > rep["mean_tokens"]["chosen"] > 0
    ex = rep["examples"][0]
    assert set(ex) == {"chosen", "rejected"} and "·" in ex["chosen"]["trained_on"]
    assert ex["chosen"]["trained_on"].rstrip("·").endswith(ex["chosen"]["text"][-5:])
    assert "equal sides dropped 1" in r.stdout and "example, rejected side" in r.stdout


def test_preference_accuracy_and_margin_from_the_log_probabilities():
    from ftkit.scoring import preference

    rows = [{"rejected": "x"}, {"rejected": "y"}, {"output": "sft row, no pair"}]
    # summed NLL of the chosen answer (nll_sum) and of the rejected one: logp(chosen) > logp(rejected) is a win
    base = {"rows": [{"nll_sum": 5.0, "rejected_nll_sum": 4.0}, {"nll_sum": 2.0, "rejected_nll_sum": 3.0}, {}]}
    tuned = {"rows": [{"nll_sum": 1.0, "rejected_nll_sum": 4.0}, {"nll_sum": 1.0, "rejected_nll_sum": 3.0}, {}]}
    got = preference(rows, base, tuned)
    assert got["pairs"] == 2
    assert got["base"] == {"accuracy": 50.0, "mean_margin": 0.0}
    assert got["fine_tuned"] == {"accuracy": 100.0, "mean_margin": 2.5}
    assert got["delta"] == {"accuracy": 50.0, "mean_margin": 2.5}
    assert preference([{"output": "a"}], {"rows": [{}]}, {"rows": [{}]}) is None


@pytest.mark.demo
@pytest.mark.parametrize("method", ["dpo"])
def test_demo_pairs_gain_held_out_preference_accuracy(method, embedded_model, tmp_path):
    """configs/demo_dpo.yaml on the embedded SmolLM2 model (~10 s a step on 2 quiet cores: make test-demo).
    Measured: 60 steps took held-out preference accuracy 55.0% -> 67.5% and the mean margin 2.13 -> 7.89 nats; the
    bound is that gain, not issue 26's +25 points, which no run here has shown yet."""
    run = tmp_path / "run"
    over = [f"train.method={method}", f"model.name_or_path={embedded_model}", f"paths.output_dir={run}"]
    over += [f"paths.latest={tmp_path / 'latest'}", "train.report_to=none", "inference.max_new_tokens=16"]
    r = run_script("finetune.py", "--config", str(REPO / "configs/demo_dpo.yaml"), *over)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("evaluate.py", "--config", str(run / "config.yaml"), "--adapter")
    assert r.returncode == 0, r.stderr[-3000:]
    pref = json.loads((run / "eval" / "eval_report.json").read_text())["preference"]
    assert pref["pairs"] == 120
    assert pref["fine_tuned"]["accuracy"] >= pref["base"]["accuracy"] + 10, pref
    assert pref["fine_tuned"]["mean_margin"] > pref["base"]["mean_margin"] + 2, pref


def test_demo_pairs_from_the_base_models_own_answers(tiny_llama):
    """generate_demo_data.py --pairs --from-base: the base answers the tasks as a run renders them, and only its
    wrong answers become the rejected ones."""
    from ftkit.config import load_config
    from ftkit.demo_data import generate, normalize_answer
    from ftkit.demo_pairs import base_answers, generate_pairs

    cfg = load_config(REPO / "configs/demo_dpo.yaml", [f"model.name_or_path={tiny_llama}", "model.gguf_source=null"])
    tasks = generate_pairs(generate(0, 5), per_family=1)
    answers = base_answers(cfg, tasks, max_new_tokens=4)
    assert set(answers) == {(t["instruction"], t["input"]) for t in tasks}
    pairs = generate_pairs(generate(0, 5), per_family=1, base_answers=answers)
    for p in pairs:
        base = answers[p["instruction"], p["input"]].strip()
        wrong = bool(base) and normalize_answer(base) != normalize_answer(p["chosen"])
        assert p["rejected_from"] == ("base" if wrong else "corrupted")
        assert p["rejected"] == base or not wrong
