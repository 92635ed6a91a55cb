"""inference.py: answering a prompt file (batched, resumable, crash-safe), base + another adapter, the chat
session's prompt rendering and Ctrl+C, and bad input. Tiny random models; a few seconds each."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_script, tiny_overrides

import inference
from ftkit import answers, chat, generation
from ftkit.config import load_config
from ftkit.errors import UserError
from ftkit.paths import RunDir, atomic_write_json, save_resolved_config
from ftkit.prompts import PromptTemplate


@pytest.fixture(scope="session")
def talky_llama(tmp_path_factory, embedded_model) -> Path:
    """A 2-layer random Llama with an untied output head whose greedy answers are visible words (the shared
    tiny_llama answers newlines only, which strip to nothing)."""
    from helpers import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("talky-llama"), embedded_model, seed=1, tied=False, bf16=False)


def make_run(root: Path, model: Path, kind: str = "chat", merged: bool = True, **extra) -> tuple:
    """A run directory as finetune.py + merge_adapter.py leave it (config, prompt template, merged/), built
    around `model` without training. Returns (cfg, RunDir)."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    over = tiny_overrides(
        model, root / "unused.json", root, **{"data.prompt_template": kind, "model.dtype": "float32", **extra}
    )
    cfg = load_config(REPO / "configs" / "demo.yaml", over)
    save_resolved_config(cfg, root / "config.yaml")
    tok = AutoTokenizer.from_pretrained(model)
    atomic_write_json(root / "prompt_template.json", PromptTemplate.from_config(kind, tok).to_json())
    if merged:
        shutil.copytree(model, root / "merged")
    (root.parent / "latest").write_text(str(root.resolve()) + "\n")
    return cfg, RunDir(root)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


PROMPTS = [
    {"instruction": "Say hi.", "id": "greet"},
    {"prompt": "Add the numbers.", "input": "2 and 3"},
    {"instruction": "A much longer instruction, with many more words in it than the others have."},
    {"instruction": "Name a colour.", "reference": "blue"},
    {"instruction": "Count to three."},
    {"instruction": "Reverse the word.", "input": "abc", "id": 17},
    {"instruction": "Why?"},
]


def test_answer_file_batched_resumable_and_crash_safe(tmp_path, talky_llama, monkeypatch):
    cfg, run = make_run(tmp_path / "run", talky_llama, **{"inference.batch_size": 3, "inference.max_new_tokens": 6})
    src = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3] + [""] + PROMPTS[3:])  # a blank line is skipped
    out = tmp_path / "out" / "answers.jsonl"
    calls: list[int] = []
    real_generate = generation.generate

    def crashing(*a, on_batch=None, **kw):
        def first_then_die(idx, answers):
            on_batch(idx, answers)
            raise KeyboardInterrupt  # as if Ctrl+C or a crash hit after the first batch was written

        calls.append(len(a[3]))
        return real_generate(*a, on_batch=first_then_die, **kw)

    monkeypatch.setattr(answers, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        answers.answer_file(cfg, run, src, out)
    first = read_jsonl(out)  # every line that made it out is complete JSON
    assert len(first) == 3 and all(isinstance(r["response"], str) for r in first)
    # Length-sorted batches: the shortest three prompts went first.
    assert "much longer" not in json.dumps(first)

    # A crash in the middle of a write leaves a cut line; resuming drops it and answers only what is missing.
    with open(out, "a") as f:
        f.write('{"id": 2, "instruction": "A much lon')
    monkeypatch.setattr(answers, "generate", lambda *a, **kw: (calls.append(len(a[3])), real_generate(*a, **kw))[1])
    rows = answers.answer_file(cfg, run, src, out)
    assert calls == [7, 4]
    final = read_jsonl(out)
    assert final == rows
    assert [r["id"] for r in final] == ["greet", 1, 2, 3, 4, 17, 6]  # input order; index when no id is given
    assert final[1]["prompt"] == "Add the numbers." and final[1]["input"] == "2 and 3"
    assert final[3]["reference"] == "blue"  # other keys are copied through
    assert sum(bool(r["response"]) for r in final) >= 5
    assert {r["id"]: r["response"] for r in first}.items() <= {r["id"]: r["response"] for r in final}.items()

    # Everything answered: a third run loads no model and changes nothing.
    before = out.read_text()
    monkeypatch.setattr(answers, "load_for_inference", lambda *a, **kw: pytest.fail("loaded a model"))
    answers.answer_file(cfg, run, src, out)
    assert out.read_text() == before


def test_answers_match_one_by_one_generation(tmp_path, talky_llama):
    """Left-padded, length-sorted batches give each prompt the answer it gets alone."""
    cfg, run = make_run(tmp_path / "run", talky_llama, **{"inference.batch_size": 4, "inference.max_new_tokens": 5})
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    rows = answers.answer_file(cfg, run, src, tmp_path / "a.jsonl")
    model, tok, template, what = generation.load_for_inference(cfg, run, "auto")
    assert what == "merged"
    one = cfg.inference.model_copy(update={"batch_size": 1})
    alone = generation.generate(
        model, tok, template, [(r.get("instruction") or r["prompt"], r.get("input")) for r in PROMPTS], one
    )
    assert [r["response"] for r in rows] == alone


def test_cli_answers_a_file_with_the_most_recent_run(tmp_path, talky_llama):
    make_run(tmp_path / "runs" / "r", talky_llama)
    write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    r = run_script("inference.py", "--input-file", "p.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "p.answers.jsonl")
    assert [row["id"] for row in rows] == ["greet", 1] and "generating" in r.stderr  # the progress bar

    # Bad lines are named, nothing is loaded or written, exit 2 with one line.
    write_jsonl(
        tmp_path / "bad.jsonl",
        [
            PROMPTS[0],
            "{not json",
            {"instruction": "  "},
            {"id": "greet", "prompt": "x"},
            ["a list"],
            {"instruction": "ok", "input": 3},
        ],
    )
    r = run_script("inference.py", "--input-file", "bad.jsonl", "--output-file", "out/a.jsonl", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "line 2 is not valid JSON" in msg[0] and "line 3 has an empty" in msg[0]
    assert 'line 4 repeats the id "greet" of line 1' in msg[0] and "2 more" in msg[0]
    assert not (tmp_path / "out").exists()


def test_bad_input_is_a_one_line_user_error(tmp_path, talky_llama):
    cfg, run = make_run(tmp_path / "run", talky_llama)
    with pytest.raises(UserError, match="holds no prompts"):
        answers.read_prompt_file(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(UserError, match="not found"):
        answers.read_prompt_file(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        answers.read_prompt_file(tmp_path / "latin1.jsonl")
    with pytest.raises(UserError, match="line 1: 'id' must be"):
        answers.read_prompt_file(write_jsonl(tmp_path / "id.jsonl", [{"instruction": "x", "id": [1]}]))
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    with pytest.raises(UserError, match="is the input file"):
        answers.answer_file(cfg, run, src, src)
    # An output file that is not ours is never appended to.
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="line 1 is not an answer row"):
        answers.answer_file(cfg, run, src, foreign)
    # A prompt longer than the context is named by its line, before anything is generated.
    long = write_jsonl(tmp_path / "long.jsonl", [PROMPTS[0], {"instruction": "word " * 600}])
    with pytest.raises(UserError, match=r"long.jsonl line 2: the prompt is \d+ tokens"):
        answers.answer_file(cfg, run, long, tmp_path / "long.out.jsonl")
    assert not (tmp_path / "long.out.jsonl").exists()
    with pytest.raises(UserError, match="the prompt is empty"):
        inference.main(cfg, run, "   ")

    # Missing and corrupt models.
    shutil.rmtree(run.merged)
    with pytest.raises(UserError, match="no merged model"):
        generation.load_for_inference(cfg, run, "merged")
    shutil.copytree(talky_llama, run.merged)
    with open(run.merged / "model.safetensors", "r+b") as f:
        f.truncate(100_000)
    with pytest.raises(UserError, match="are corrupt"):
        generation.load_for_inference(cfg, run, "merged")
    (run.merged / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="cannot read a model config"):
        generation.load_for_inference(cfg, run, "merged")


def test_corrupt_model_from_the_command_line(tmp_path, talky_llama):
    make_run(tmp_path / "runs" / "r", talky_llama)
    (tmp_path / "runs" / "r" / "merged" / "model.safetensors").write_bytes(b"garbage")
    r = run_script("inference.py", "--prompt", "hi", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()[-1:]) == 1 and "Traceback" not in r.stderr
    assert "are corrupt" in r.stderr and "merged" in r.stderr


def test_another_adapter_over_the_same_base(tmp_path, talky_llama, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, run = make_run(tmp_path / "runs" / "a", talky_llama, merged=False)
    other = tmp_path / "runs" / "b" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32)
    torch.manual_seed(3)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(other)
    model, tok, template, what = generation.load_for_inference(cfg, run, "auto", adapter=other)
    assert what == "adapter" and isinstance(model, PeftModel)
    ids = torch.tensor([[1, 400, 500, 600]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32), other)
    plain = AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32)
    with torch.no_grad():
        got, want, no_adapter = model(ids).logits, ref(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, no_adapter, atol=1e-3)
    with pytest.raises(UserError, match="no adapter in"):
        generation.load_for_inference(cfg, run, "auto", adapter=tmp_path / "nowhere")

    # The flag: `--adapter` alone, `--adapter DIR`, and an override right after `--adapter`.
    seen = []
    monkeypatch.setattr(
        inference,
        "main",
        lambda cfg, run, prompt, inp, use, adapter: seen.append((use, adapter, cfg.inference.max_new_tokens)),
    )
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["--adapter", "--prompt", "x"],
        ["--adapter", str(other), "--prompt", "x"],
        ["--adapter", "inference.max_new_tokens=3", "--prompt", "x"],
    ):
        inference.cli(argv)
    assert seen == [("adapter", None, 8), ("adapter", other, 8), ("adapter", None, 3)]
    with pytest.raises(UserError, match="--chat and --input-file|--input-file and --chat"):
        inference.cli(["--chat", "--input-file", "p.jsonl"])
    with pytest.raises(UserError, match="--output-file needs --input-file"):
        inference.cli(["--output-file", "a.jsonl", "--prompt", "x"])


def test_chat_renders_the_conversation_in_the_training_format(tmp_path, talky_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(talky_llama)
    model = AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32)
    icfg = load_config(None, ["inference.max_new_tokens=4"]).inference
    for kind in ("chat", "alpaca"):
        template = PromptTemplate.from_config(kind, tok)
        s = chat.ChatSession(model, tok, template, icfg, out=open(os.devnull, "w"))
        a1, stopped = s.reply("First question?")
        assert not stopped and s.history[-1] == {"role": "assistant", "content": a1}
        s.handle("/system Be brief.")
        got = s.prompt_ids("Second?", s.history)
        if kind == "chat":
            msgs = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "First question?"},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": "Second?"},
            ]
            want = tok(
                tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
        else:  # Alpaca: the new message is the instruction, the earlier turns the Input field
            t = PromptTemplate.from_config("alpaca", tok, system_prompt="Be brief.")
            want = t.prompt_ids(tok, "Second?", f"User: First question?\nAssistant: {a1}")
        assert got == want
        s.handle("/reset")
        assert s.history == [] and s.system == "Be brief."
        s.handle("/system")
        assert s.system == template.system_prompt


def test_chat_ctrl_c_keeps_the_partial_answer(tmp_path, talky_llama, monkeypatch, capsys):
    """A real SIGINT during generation, as Ctrl+C sends it: generation stops, the partial answer stays."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(talky_llama)
    model = AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32)
    icfg = load_config(None, ["inference.max_new_tokens=200"]).inference
    s = chat.ChatSession(model, tok, PromptTemplate.from_config("chat", tok), icfg)

    class InterruptingStreamer(transformers.TextStreamer):
        n = 0

        def put(self, value):
            super().put(value)
            InterruptingStreamer.n += 1
            if InterruptingStreamer.n == 6:  # the prompt, then 5 tokens
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(transformers, "TextStreamer", InterruptingStreamer)
    # What SIGINT did before (a background CI job may inherit SIG_IGN); reply() must put it back.
    before = signal.getsignal(signal.SIGINT)
    answer, stopped = s.reply("Tell me a long story.")
    assert stopped and answer and len(tok(answer, add_special_tokens=False)["input_ids"]) < 20
    assert s.history[-1] == {"role": "assistant", "content": answer, "interrupted": True}
    out = capsys.readouterr().out
    assert answer.split()[0] in out and "[stopped; the partial answer is kept]" in out
    assert signal.getsignal(signal.SIGINT) is before  # the handler is only set while answering
    s.handle(f"/save {tmp_path / 'chat.json'}")
    saved = json.loads((tmp_path / "chat.json").read_text())
    # The cut answer is kept, marked so that training on the transcript never learns a cut answer.
    assert saved["messages"] == s.history[:-1] + [{**s.history[-1], "train": False}] and saved["template"] == "chat"


def test_chat_save_writes_messages_rows_that_dataset_reads_back(tmp_path, talky_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.config import DataCfg
    from ftkit.data import clean_records, load_records

    tok = AutoTokenizer.from_pretrained(talky_llama)
    model = AutoModelForCausalLM.from_pretrained(talky_llama, dtype=torch.float32)
    icfg = load_config(None, ["inference.max_new_tokens=4"]).inference
    s = chat.ChatSession(model, tok, PromptTemplate.from_config("chat", tok), icfg, out=open(os.devnull, "w"))
    path = tmp_path / "chats.jsonl"
    s.handle("/system Be brief.")
    s.reply("First question?")
    s.reply("Second?")
    s.handle(f"/save {path}")
    s.handle("/reset")
    s.reply("Another talk")
    s.handle(f"/save {path}")  # a .jsonl of transcripts collects them
    assert len(path.read_text().splitlines()) == 2
    d = DataCfg(path=str(path))
    records, _ = load_records(d)
    rows, st = clean_records(records, d, str(path))
    assert st.format == "messages" and len(rows) == 2
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rows[0]["messages"][0]["content"] == "Be brief." and rows[1]["messages"][1]["content"] == "Another talk"
    # A single transcript saved as .json reads back as one conversation too.
    one = tmp_path / "one.json"
    s.handle(f"/save {one}")
    records, _ = load_records(DataCfg(path=str(one)))
    assert clean_records(records, DataCfg(), str(one))[0][0]["messages"][-2]["content"] == "Another talk"


def test_input_file_answers_the_last_user_turn_of_conversations(tmp_path, talky_llama):
    from transformers import AutoTokenizer

    cfg, run = make_run(tmp_path / "runs" / "r", talky_llama)
    talk = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one?"},
    ]
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}]
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [{"messages": talk, "id": "m"}, {"conversations": sharegpt, "id": "s"}, {"instruction": "Say hi."}],
    )
    rows = answers.read_prompt_file(src)
    assert rows[0]["prompt"] == talk and rows[0]["instruction"] == "Another one?"
    assert [m["content"] for m in rows[1]["prompt"]] == ["Hi", "Hello", "Bye"]
    tok = AutoTokenizer.from_pretrained(talky_llama)
    template = PromptTemplate.load(run.prompt_template)
    want = tok(tok.apply_chat_template(talk, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert generation.prompt_ids(tok, template, rows[0]["prompt"]) == want["input_ids"]
    out = answers.answer_file(cfg, run, src, tmp_path / "a.jsonl")
    assert [o["id"] for o in out] == ["m", "s", 2] and all(isinstance(o["response"], str) for o in out)
    assert out[0]["messages"] == talk  # the row is copied through
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "function", "content": "x"}]}])
    with pytest.raises(UserError, match="line 1 turn 1 has an unknown role 'function'"):
        answers.read_prompt_file(bad)
