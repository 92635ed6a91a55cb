"""evaluate.py: the scoring functions on hand cases, the report's arithmetic, the stage end to end on a tiny
random Llama trained for 2 steps, and bad input (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import REPO, run_script, tiny_overrides

import evaluate as ev
from ftkit import scoring
from ftkit.errors import UserError
from ftkit.paths import stage_config

DEMO = str(REPO / "configs" / "demo.yaml")


# -- scoring on hand cases -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, ref, want",
    [
        ("42", "42", 1.0),
        ("  42. ", "42", 1.0),
        ("Paris", "paris", 1.0),
        ("30,  64, 96", "30, 64, 96", 1.0),
        ("The answer is 42.", "42", 0.0),
        ("", "42", 0.0),
        ("421", "42", 0.0),
        ("30, 96, 64", "30, 64, 96", 0.0),
    ],
)
def test_exact_match(pred, ref, want):
    assert scoring.exact_match(pred, ref) == want


def test_rouge_l():
    assert scoring.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert scoring.rouge_l("dogs bark loudly", "the cat sat on the mat") == 0.0
    # LCS "the cat sat" = 3 words: precision 3/3, recall 3/6, F1 = 2/3.
    assert scoring.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert scoring.rouge_l("", "anything") == 0.0


def test_aggregate_by_family():
    rows = [
        {"family": "math", "verifiable": True, "output": "1"},
        {"family": "math", "verifiable": True, "output": "2"},
        {"family": "math", "verifiable": True, "output": "3"},
        {"family": "open", "verifiable": False, "output": "x"},
        {"output": "y"},
    ]  # no family, no verifiable flag: open-ended, family "all"

    def measured(scores, nll, tokens):
        return {"rows": [{"score": s, "nll_sum": a, "tokens": t, "answer": ""} for s, a, t in zip(scores, nll, tokens)]}

    base = measured([0, 0, 1, 0.2, 0.4], [4.0, 4.0, 4.0, 6.0, 2.0], [2, 2, 2, 3, 1])
    tuned = measured([1, 1, 1, 0.5, 0.6], [1.0, 1.0, 1.0, 3.0, 1.0], [2, 2, 2, 3, 1])
    agg = scoring.aggregate(rows, base, tuned)
    math_ = agg["families"]["math"]
    assert math_["metric"] == "exact_match" and math_["rows"] == 3
    assert math_["base"]["exact_match"] == pytest.approx(33.33) and math_["fine_tuned"]["exact_match"] == 100.0
    assert math_["base"]["eval_loss"] == pytest.approx(2.0) and math_["fine_tuned"]["eval_loss"] == pytest.approx(0.5)
    assert math_["base"]["rouge_l"] is None
    assert agg["families"]["open"]["metric"] == "rouge_l" and agg["families"]["open"]["fine_tuned"]["rouge_l"] == 50.0
    assert list(agg["families"]) == ["math", "all", "open"]  # verifiable families first
    o = agg["overall"]
    # Token-weighted: (12 + 6 + 2) / 10 tokens; perplexity is exp of that.
    assert o["base"]["eval_loss"] == pytest.approx(2.0) and o["base"]["perplexity"] == pytest.approx(
        math.e**2, rel=1e-3
    )
    assert o["fine_tuned"]["eval_loss"] == pytest.approx(0.7)
    assert o["base"]["rouge_l"] == pytest.approx(30.0) and o["delta"]["exact_match"] == pytest.approx(66.67, abs=0.01)
    assert o["verifiable_rows"] == 3 and o["rows"] == 5


# -- end to end on a tiny model --------------------------------------------------------------------
TASKS = (
    [
        {
            "instruction": f"What is {a} + {b}?",
            "input": "",
            "output": str(a + b),
            "family": "arithmetic",
            "verifiable": True,
        }
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3), (9, 9), (5, 2), (3, 3), (7, 1)]
    ]
    + [
        {
            "instruction": f'Reverse the letters of "{w}".',
            "input": "",
            "output": w[::-1],
            "family": "word_ops",
            "verifiable": True,
        }
        for w in ("cat", "sun", "map", "owl", "egg", "fox")
    ]
    + [
        {
            "instruction": f"Describe a {w} in one sentence.",
            "input": "",
            "output": f"A {w} is a common thing.",
            "family": "open_ended",
            "verifiable": False,
        }
        for w in ("tree", "lamp", "river", "cloud", "boat", "bell")
    ]
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A tiny run trained for 2 steps; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("evalrun")
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TASKS))
    over = tiny_overrides(
        tiny_llama,
        data,
        root / "run",
        **{
            # In-loop eval every step, the best checkpoint kept and reloaded, early stopping armed.
            "data.eval_size": 8,
            "train.max_steps": 2,
            "train.eval_steps": 1,
            "train.save_steps": 1,
            "train.load_best_model_at_end": "true",
            "train.early_stopping_patience": 3,
            "train.save_total_limit": 1,
            "train.per_device_train_batch_size": 4,
            "inference.max_new_tokens": 6,
            "inference.batch_size": 4,
        },
    )
    r = run_script("finetune.py", "--config", str(DEMO), *over)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", over


def copy_run(trained, tmp_path) -> tuple[Path, list[str]]:
    src, over = trained
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    over = [o for o in over if not o.startswith(("paths.output_dir=", "paths.latest="))]
    return dst, over + [f"paths.output_dir={dst}", f"paths.latest={tmp_path / 'latest'}"]


def test_evaluate_end_to_end(trained, tmp_path, capsys):
    run, over = copy_run(trained, tmp_path)
    held_out = [json.loads(line) for line in (run / "eval_rows.jsonl").read_text().splitlines()]
    assert {r["verifiable"] for r in held_out} == {True, False}  # the fixture exercises both scores
    ev.cli(["--config", DEMO, *over])
    out = capsys.readouterr().out
    d = run / "eval"
    for f in ("eval_report.json", "eval_report.md", "loss_curves.png", "before_after.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    assert not list(run.glob(".eval*")), "temporary folders left behind"
    rep = json.loads((d / "eval_report.json").read_text())
    assert rep["models"]["fine_tuned_weights"] == "adapter" and rep["overall"]["rows"] == len(held_out)
    for name in ("base", "fine_tuned"):
        m = rep["overall"][name]
        assert math.isfinite(m["eval_loss"]) and m["eval_loss"] > 0 and math.isfinite(m["perplexity"])
        assert 0 <= m["exact_match"] <= 100 and 0 <= m["rouge_l"] <= 100
    # Two training steps at lr 1e-3 change the adapter, hence the loss.
    assert rep["overall"]["base"]["eval_loss"] != rep["overall"]["fine_tuned"]["eval_loss"]
    assert set(rep["families"]) == {r["family"] for r in held_out}
    assert len(rep["examples"]) == 5 and len(rep["rows"]) == len(held_out)
    assert rep["settings"]["max_new_tokens"]["open_ended"] == 6
    assert rep["settings"]["max_new_tokens"]["verifiable"] <= 6
    md = (d / "eval_report.md").read_text()
    assert "](loss_curves.png)" in md and "](before_after.png)" in md and md.count("- fine-tuned (") == 5
    assert "| family |" in out and "all rows" in out  # the table is printed


def test_lm_eval_harness_numbers_beside_the_projects(tmp_path, tiny_llama, capsys):
    """--lm-eval: EleutherAI's harness scores both models on the held-out rows as a local task (offline), and its
    numbers land in both reports next to the project's own. Its own run: the module's fixture warms up and decays
    to a learning rate of 0 within its 2 steps, so its adapter is still the identity."""
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TASKS))
    run = tmp_path / "run"
    extra = {"data.eval_size": 8, "train.max_steps": 3, "train.eval_steps": "null", "train.save_steps": 3}
    over = tiny_overrides(tiny_llama, data, run, **extra, **{"train.warmup_steps": 0, "inference.batch_size": 4})
    r = run_script("finetune.py", "--config", str(DEMO), *over, "train.lr_scheduler_type=constant")
    assert r.returncode == 0, r.stderr[-3000:]
    ev.cli(["--config", DEMO, *over, "--lm-eval"])
    rep = json.loads((run / "eval" / "eval_report.json").read_text())
    h = rep["lm_eval"]
    assert h["harness"].startswith("lm-evaluation-harness 0.4") and h["rows"] == rep["overall"]["rows"]
    for name in ("base", "fine_tuned"):
        assert 0 <= h[name]["acc"] <= 1 and math.isfinite(h[name]["perplexity"]) and h[name]["perplexity"] > 1
    # The adapter changed the answers' likelihoods, and the harness sees it.
    assert h["base"]["perplexity"] != h["fine_tuned"]["perplexity"]
    # Perplexity per row of whole answers vs the project's per-token loss: the same direction of change.
    own = rep["overall"]
    assert (h["fine_tuned"]["perplexity"] < h["base"]["perplexity"]) == (
        own["fine_tuned"]["eval_loss"] < own["base"]["eval_loss"]
    )
    assert "## lm-evaluation-harness" in (run / "eval" / "eval_report.md").read_text()
    assert "| acc (answer = greedy continuation) |" in capsys.readouterr().out


def test_merged_model_preferred_and_old_report_kept_on_failure(trained, tmp_path, capsys, monkeypatch):
    run, over = copy_run(trained, tmp_path)
    import merge_adapter

    cfg, rd = stage_config(DEMO, over)
    merge_adapter.main(cfg, rd)
    report = ev.main(cfg, rd)
    assert report["models"]["fine_tuned_weights"] == "merged"
    before = (run / "eval" / "eval_report.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ev, "plot_before_after", boom)
    with pytest.raises(RuntimeError):
        ev.main(cfg, rd)
    assert (run / "eval" / "eval_report.json").read_text() == before
    assert not list(run.glob(".eval*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "holds no rows"),
        ("no_reference", "no reference answer"),
        ("no_rows_file", "eval_rows.jsonl' is missing"),
        ("no_adapter", "no adapter"),
        ("no_base", "does not exist"),
        ("base_vs_base", "compare the base model with itself"),
    ],
)
def test_bad_input(trained, tmp_path, case, message):
    run, over = copy_run(trained, tmp_path)
    rows = run / "eval_rows.jsonl"
    if case == "empty":
        rows.write_text("\n")
    elif case == "no_reference":
        rows.write_text(rows.read_text() + json.dumps({"instruction": "What is 2 + 2?", "input": ""}) + "\n")
    elif case == "no_rows_file":
        rows.unlink()
    elif case == "no_adapter":
        shutil.rmtree(run / "adapter")
    elif case == "no_base":
        over.append(f"model.name_or_path={tmp_path / 'gone'}")
    elif case == "base_vs_base":
        over.append("inference.use=base")
    with pytest.raises(UserError) as e:
        ev.cli(["--config", DEMO, *over])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (run / "eval").exists() and not list(run.glob(".eval*"))


def test_bad_input_is_one_line_exit_2_from_the_command_line(trained, tmp_path):
    run, over = copy_run(trained, tmp_path)
    (run / "eval_rows.jsonl").write_text("")
    r = run_script("evaluate.py", "--config", DEMO, *over, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "holds no rows" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (run / "eval").exists()


def test_no_run_is_one_line_exit_2_from_the_command_line(tmp_path):
    r = run_script("evaluate.py", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no recent run" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


# -- in-loop evaluation during training (finetune.py) ------------------------------------------------
def test_in_loop_eval_keeps_the_best_checkpoint(trained):
    from safetensors.torch import load_file

    run, _ = trained
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    assert sorted(evals) == [1, 2] and all(math.isfinite(v) for v in evals.values())
    summary = json.loads((run / "run_summary.json").read_text())
    best_step = min(evals, key=evals.get)
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert summary["best_metric"] == pytest.approx(evals[best_step])
    # save_total_limit=1 never deletes the best checkpoint, and the saved adapter is the best one.
    best = load_file(Path(summary["best_checkpoint"]) / "adapter_model.safetensors")
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert best.keys() == final.keys() and all((best[k].float() - final[k].float()).abs().max() == 0 for k in best)


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"train.load_best_model_at_end": "true", "train.eval_steps": 3, "train.save_steps": 10},
            "must be a multiple of train.eval_steps (3); set train.save_steps=9",
        ),
        ({"train.early_stopping_patience": 2, "train.eval_steps": 4, "train.save_steps": 6}, "set train.save_steps=8"),
        (
            {"train.load_best_model_at_end": "true", "train.eval_steps": 2, "train.save_steps": 4, "data.eval_size": 0},
            "needs held-out rows",
        ),
    ],
)
def test_keeping_the_best_checkpoint_needs_matching_steps(tmp_path, over, message):
    from ftkit import train
    from ftkit.config import load_config

    cfg = load_config(DEMO, tiny_overrides(tmp_path / "model", tmp_path / "data.json", tmp_path / "run", **over))
    with pytest.raises(UserError) as e:
        train.check_eval_settings(cfg, 0 if over.get("data.eval_size") == 0 else 4)
    assert message in str(e.value)
