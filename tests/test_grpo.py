"""GRPO (train.method=grpo): the rewards (ftkit/rewards.py), the prompts handed to TRL (ftkit/rl_rows.py), a tiny
chain finetune -> merge -> inference -> evaluate on one run folder with a user's reward file, and a reward that
fails during training. The demo's claim (configs/demo_grpo.yaml) is measured by benchmarks/results, not here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, run_script, tiny_overrides

from ftkit import rewards
from ftkit.config import load_config
from ftkit.errors import UserError

ROWS = [dict(r, instruction=f"{r['instruction']} (variant {k})") for k in range(3) for r in ALPACA_ROWS]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# -- rewards ---------------------------------------------------------------------------------------------------
def test_builtin_rewards_score_as_evaluate_does():
    assert rewards.exact_match(["Paris.", "  paris ", "Lyon", "x"], ["Paris", "Paris", "Paris", None]) == [
        1.0,
        1.0,
        0.0,
        pytest.approx(math.nan, nan_ok=True),
    ]
    assert rewards.one_line(["5", "5\nbecause", "   ", " 7 "]) == [1.0, 0.0, 0.0, 1.0]
    assert rewards.one_line(["42", "x42", "42\n"], r"\d+") == [1.0, 0.0, 1.0]
    assert rewards.length_penalty([[0] * 8, [0] * 12, [0] * 16, [0] * 40], 8) == [0.0, -0.5, -1.0, -1.0]


@pytest.mark.parametrize(
    "out, keyword",
    [
        ([1.0, 2.0, 3.0], "returned 3 values for 2 completions"),
        (0.5, "returned float, not a list of numbers"),
        ("10", "returned str, not a list of numbers"),
        ([1.0, float("nan")], "returned nan for completion 1"),
        ([1.0, float("inf")], "returned inf for completion 1"),
        ([1.0, "good"], "returned 'good' (str) for completion 1, not a number"),
        ([True, 0.0], "returned True (bool) for completion 0, not a number"),
        ({"a": 1.0, "b": 0.0}, "returned dict, not a list of numbers"),
    ],
)
def test_a_reward_that_misbehaves_is_one_line_naming_it(out, keyword):
    r = rewards.Reward("mine.score", lambda **kw: out, True, rewards.Recorder(), lambda: "; the last good checkpoint")
    with pytest.raises(UserError) as e:
        r(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1], [2]], answer=["a", "a"])
    assert "reward mine.score" in str(e.value) and keyword in str(e.value) and "last good checkpoint" in str(e.value)


def test_a_reward_that_raises_names_itself_and_none_means_no_reward():
    def boom(**kw):
        raise KeyError("answer_text")

    with pytest.raises(UserError, match="reward mine.boom raised KeyError: 'answer_text'; fix the function"):
        rewards.Reward("mine.boom", boom, True, rewards.Recorder())(
            prompts=["p"], completions=["a"], completion_ids=[[1]]
        )
    values = rewards.Reward("mine.skip", lambda **kw: [None, 1], True, rewards.Recorder())(
        prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1], [2]]
    )
    assert math.isnan(values[0]) and values[1] == 1.0

    async def later(completions, **kw):  # TRL takes async rewards: awaited inside the call
        return [0.5] * len(completions)

    assert rewards.Reward("mine.later", later, True, rewards.Recorder())(
        prompts=["p"], completions=["a"], completion_ids=[[1]]
    ) == [0.5]


def test_a_user_reward_is_loaded_with_a_warning_and_tried_on_a_row(tmp_path, caplog, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / ".cache/models/SmolLM2-135M-Instruct")
    (tmp_path / "mine.py").write_text(
        "SEEN = []\n"
        "def score(prompts, completions, completion_ids, answer, family, **kw):\n"
        "    SEEN.append((completions, answer, family, kw['trainer_state']))\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs/demo.yaml", ["train.method=grpo", "train.rewards=[exact_match,mine.py:score]"])
    rows = [{"prompt": "Q?", "answer": "Blue", "family": "colors"}]
    with caplog.at_level("WARNING"):
        loaded = rewards.load(cfg.train, rows, tok)
    assert "runs its Python code" in caplog.text and "mine.py" in caplog.text
    (tmp_path / "bad.py").write_text("def score(completions, **kw):\n    return [1.0, 2.0]\n")
    bad = load_config(REPO / "configs/demo.yaml", ["train.method=grpo", "train.rewards=[bad.py:score]"])
    with pytest.raises(UserError, match=r"returned 2 values for 1 completions; .*\(tried on the first training row"):
        rewards.load(bad.train, rows, tok, lambda: "; the last good checkpoint is ...")
    assert [r.name for r in loaded] == ["exact_match", "mine.score"]
    module = loaded[1].fn.__globals__
    assert module["SEEN"] == [(["Blue"], ["Blue"], ["colors"], None)]  # TRL's keyword arguments, the row's columns
    # What completions.jsonl would get for a batch: each reward, and the weighted sum.
    batch = dict(prompts=["Q?"] * 2, completions=["Blue", "Red"], completion_ids=[[1], [2]], answer=["Blue"] * 2)
    for r in loaded:
        r(**batch, family=["colors"] * 2, trainer_state=None)
    got = loaded[0].recorder.rows(7, {"exact_match": 2.0, "mine.score": 0.5})
    assert [(g["step"], g["rewards"], g["reward"]) for g in got] == [
        (7, {"exact_match": 1.0, "mine.score": 4.0}, 4.0),
        (7, {"exact_match": 0.0, "mine.score": 3.0}, 1.5),
    ]


# -- the prompts -------------------------------------------------------------------------------------------------
def bos_adding_tokenizer():
    """A tokenizer that adds BOS itself (as Llama-3's does), with Llama-3's header and end-of-turn tokens."""
    from helpers import offline_tokenizer

    t = offline_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return t


@pytest.mark.parametrize(
    "template, tokenizer", [("chat", "smollm2"), ("alpaca", "smollm2"), ("alpaca", "bos"), ("llama3", "bos")]
)
def test_prompts_handed_to_trl_tokenize_as_the_template_does(template, tokenizer, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from ftkit.pairs import load_clean_split, prepare

    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    open_end = {"messages": [*conv["messages"], {"role": "user", "content": "And now?"}]}
    data = tmp_path / "d.jsonl"
    as_conv = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in ROWS
    ]
    data.write_text(jsonl([*as_conv, conv, open_end]) if template != "alpaca" else jsonl(ROWS))
    over = [f"data.path={data}", "data.eval_size=0", f"data.prompt_template={template}", "train.method=grpo"]
    cfg = load_config(REPO / "configs/demo.yaml", [*over, "train.rewards=[format]", "train.max_completion_length=16"])
    tok = AutoTokenizer.from_pretrained(tiny_llama) if tokenizer == "smollm2" else bos_adding_tokenizer()
    prep = prepare(cfg, tok, load_clean_split(cfg.data, "grpo"))
    for row, n, src in zip(prep.train.rows, prep.train.lengths, prep.train.kept):
        # TRL tokenizes the prompt text itself, with the tokenizer's special tokens: exactly the template's ids
        got = tok(row["prompt"])["input_ids"]
        if "messages" in src:
            want = prep.template.messages_prompt_ids(
                tok, src["messages"][: len(src["messages"]) - (row["answer"] is not None)]
            )
        else:
            want = prep.template.prompt_ids(tok, src["instruction"], src["input"] or None)
        assert got == want and len(got) + 16 == n
        assert got[:2] != [tok.bos_token_id] * 2  # one BOS, not the template's and the tokenizer's
    answers = {r["answer"] for r in prep.train.rows}
    assert {"5", "Blue"} <= answers
    if template != "alpaca":
        assert "Hello" in answers and None in answers  # a conversation ending with a user turn: a prompt, no answer
        assert prep.report["without_answer"] == 1
    rep = prep.report
    assert rep["train_rows"] == len(prep.train.rows) and rep["rewards"] == ["format"]


def test_the_rewards_get_the_fields_every_row_has_with_one_type_and_tools_are_refused(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from ftkit.prompts import PromptTemplate
    from ftkit.rl_rows import encode_prompts, shared_fields

    rows = [dict(r, family="a", id=i, note=None if i else "x", tags=["t"]) for i, r in enumerate(ROWS)]
    rows[3]["id"] = "four"  # mixed types: no column of one type
    rows[5].pop("family")  # not in every row
    rows[6]["completions"] = "a name TRL passes a reward itself"
    assert shared_fields(rows) == []
    assert shared_fields([dict(r, family="a", n=1) for r in ROWS]) == ["family", "n"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = load_config(REPO / "configs/demo.yaml", ["train.method=grpo", "train.max_completion_length=16"])
    template = PromptTemplate.from_config("chat", tok)
    conv = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny"}]}
    with pytest.raises(UserError, match="offers tools .*drop the tools field"):
        encode_prompts([dict(conv, tools=[{"type": "function"}])], template, tok, cfg)
    call_only = {"messages": [conv["messages"][0], {"role": "assistant", "content": None, "tool_calls": [{}]}]}
    enc, _ = encode_prompts([call_only], template, tok, cfg)
    assert enc.rows[0]["answer"] is None  # a tool call is no text answer for exact_match


def test_runs_saved_with_the_old_beta_default_still_load(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text((REPO / "configs/demo.yaml").read_text().replace("train:\n", "train:\n  beta: 0.1\n", 1))
    assert load_config(saved).train.beta == 0.1  # written while beta defaulted to 0.1, whatever the method
    with pytest.raises(UserError, match="train.beta applies to train.method=dpo"):
        load_config(REPO / "configs/demo.yaml", ["train.beta=0.2"])


def test_prompts_too_long_for_the_completion_budget_are_dropped_and_counted(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from ftkit.pairs import load_clean_split, prepare

    data = tmp_path / "d.jsonl"
    data.write_text(jsonl([*ROWS, dict(ROWS[0], input=" ".join(["word"] * 200))]))
    over = [f"data.path={data}", "data.eval_size=0", "train.method=grpo", "data.max_length=128"]
    cfg = load_config(REPO / "configs/demo.yaml", [*over, "train.max_completion_length=32"])
    prep = prepare(cfg, AutoTokenizer.from_pretrained(tiny_llama), load_clean_split(cfg.data, "grpo"))
    assert prep.report["prompt_too_long_dropped"] == 1 and len(prep.train.rows) == len(ROWS)
    assert max(prep.train.lengths) <= 128


# -- the chain -----------------------------------------------------------------------------------------------------
REWARD_FILE = """
CALLS = {"n": 0}
def longer(completions, answer, **kw):
    # Rewards longer completions: the completions of one prompt differ, so there is something to learn.
    CALLS["n"] += 1
    if CALLS["n"] > FAIL_AFTER:
        raise RuntimeError("the grader is down")
    return [len(c) / 50 for c in completions]
"""


def grpo_run(tiny_llama, tmp_path: Path, fail_after: int = 10**6, **extra):
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(ROWS))
    (tmp_path / "grader.py").write_text(f"FAIL_AFTER = {fail_after}\n{REWARD_FILE}")
    run = tmp_path / "run"
    over = {
        "train.method": "grpo",
        "train.num_generations": 4,
        "train.max_completion_length": 12,
        "train.rewards": f"[exact_match,format,length,{tmp_path / 'grader.py'}:longer]",
        "train.reward_weights": "[1.0,0.5,0.5,1.0]",
        "train.reward_length_limit": 6,
        "train.max_steps": 3,
        "train.report_to": "tensorboard",
        **extra,
    }
    r = run_script(
        "finetune.py", "--config", str(REPO / "configs/demo.yaml"), *tiny_overrides(tiny_llama, data, run, **over)
    )
    return r, run


def test_grpo_trains_logs_its_rewards_and_the_stages_after_read_the_run(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    r, run = grpo_run(tiny_llama, tmp_path, **{"train.beta": 0.05})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "runs its Python code" in r.stderr  # the user's reward file, loaded with a warning
    plan = json.loads((run / "plan.json").read_text())
    assert plan["trainer"] == "trl.GRPOTrainer" and plan["generator"] == "transformers"
    assert "KL term" in plan["reference"] and plan["eval_steps"] is None
    assert {c["key"] for c in plan["changes"]} >= {"train.use_vllm", "train.eval_steps", "train.padding_free"}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    keys = ("rewards/exact_match/mean", "rewards/grader.longer/std", "reward", "kl", "completions/mean_length")
    for key in (*keys, "sampling_s"):
        assert all(math.isfinite(row[key]) for row in steps), key
    assert all(row["completions/max_length"] <= 12 and 0 < row["sampling_s"] < row["step_time"] for row in steps)
    # completions.jsonl: every logging step's completions with each reward and the weighted sum
    done = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert sorted({d["step"] for d in done}) == [1, 2, 3] and len(done) == 3 * 4
    for d in done:
        assert set(d["rewards"]) == {"exact_match", "format", "length", "grader.longer"}
        weights = {"exact_match": 1.0, "format": 0.5, "length": 0.5, "grader.longer": 1.0}
        assert d["reward"] == pytest.approx(sum(weights[k] * v for k, v in d["rewards"].items()))
        assert d["rewards"]["grader.longer"] == pytest.approx(len(d["completion"]) / 50)
        assert d["answer"] in {row["output"] for row in ROWS}
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    assert not any(".ref." in k for k in weights)  # no reference copy of the adapter: the base is the reference
    for script, args in (
        ("merge_adapter.py", []),
        ("inference.py", ["--prompt", "Add the numbers.", "--input", "2 and 3"]),
        ("evaluate.py", []),
        ("export_gguf.py", ["--type", "Q8_0"]),
    ):
        r = run_script(script, "--config", str(run / "config.yaml"), *args)
        assert r.returncode == 0, (script, r.stderr[-3000:])
    report = json.loads((run / "eval" / "eval_report.json").read_text())
    assert len(report["rows"]) == 4 and all("fine_tuned" in row for row in report["rows"])


def test_a_reward_failing_during_training_stops_with_the_last_checkpoint_named(tiny_llama, tmp_path):
    # The reward runs once when it is tried, then once a step: the 4th call is step 3's, after checkpoint-2.
    r, run = grpo_run(tiny_llama, tmp_path, fail_after=3, **{"train.save_steps": 1})
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: reward grader.longer raised RuntimeError: the grader is down; fix the function")
    assert "the last good checkpoint is" in line and "checkpoint-2" in line and "--resume" in line
    assert "Traceback" not in r.stderr
    assert (run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    # The grader fixed, --resume finishes the run from checkpoint-2; completions.jsonl holds each step once.
    (tmp_path / "grader.py").write_text(f"FAIL_AFTER = 10**6\n{REWARD_FILE}")
    r = run_script("finetune.py", "--config", str(run / "config.yaml"), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    done = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [d["step"] for d in done] == [1] * 4 + [2] * 4 + [3] * 4
    assert json.loads((run / "run_summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


@pytest.mark.demo
def test_demo_grpo_gains_held_out_exact_match(embedded_model, tmp_path):
    """configs/demo_grpo.yaml on the embedded SmolLM2 model (make test-demo; ~10 min on 2 quiet cores). Measured: 60
    steps took held-out exact match on the extraction family 3.3% -> 96.7% (benchmarks/results/demo_grpo_cpu.json);
    the bound is issue 29's +20 points."""
    run = tmp_path / "run"
    over = [f"model.name_or_path={embedded_model}", f"paths.output_dir={run}", f"paths.latest={tmp_path / 'latest'}"]
    r = run_script("finetune.py", "--config", str(REPO / "configs/demo_grpo.yaml"), *over, "train.report_to=none")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("evaluate.py", "--config", str(run / "config.yaml"), "--adapter")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((run / "eval" / "eval_report.json").read_text())["verifiable"]
    assert got["rows"] == 60 and got["fine_tuned"]["exact_match"] >= got["base"]["exact_match"] + 20, got
