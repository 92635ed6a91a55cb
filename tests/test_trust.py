"""Issue 24, trust every byte round 3: what a careless or hostile user did from outside, each as the behaviour it
must have now. A user's file is never followed, truncated or replaced; a copied run acts on itself; what is saved
is what was asked (redaction is for display); masks, mixes and adapters mean what they say."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import ALPACA_ROWS, REPO, run_script, tiny_overrides

from ftkit.cli import redact
from ftkit.config import load_config
from ftkit.data import clean_conversation, load_clean_split
from ftkit.errors import UserError
from ftkit.paths import atomic_write_text
from ftkit.runlock import RunLock

DEMO = str(REPO / "configs" / "demo.yaml")
# Shaped like a hub token, so display redacts it; a system prompt may still hold such text on purpose.
TOKEN_LIKE = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_error_line(r, *names: str) -> str:
    """The run ended as bad input: exit 2, a single `error:` line naming each of `names`."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), r.stderr
    for n in names:
        assert n in line, line
    return line


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "rows.json"
    p.write_text(json.dumps([dict(r, instruction=f"{r['instruction']} ({k})") for k in range(3) for r in ALPACA_ROWS]))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, data_file) -> Path:
    """One finished 2-step run (checkpoint-2 and adapter/), trained under HF_TOKEN=models in a folder whose path
    holds "models", with a token-shaped string in its system prompt: the tests below copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "models" / "r0"
    over = tiny_overrides(
        tiny_llama,
        data_file,
        run,
        **{
            "train.max_steps": 2,
            "train.save_steps": 2,
            "train.eval_steps": 2,
            "data.system_prompt": f"Use {TOKEN_LIKE}.",
        },
    )
    r = run_script("finetune.py", "--config", DEMO, *over, env={"HF_TOKEN": "models"})
    assert r.returncode == 0, r.stderr
    return run


# -- data lost or changed ------------------------------------------------------------------------------------------
def test_a_lock_that_is_a_link_or_the_users_file_is_never_written(tmp_path, tiny_llama, data_file):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = tmp_path / "fresh"
    out.mkdir()
    (out / ".lock").symlink_to(notes)
    over = tiny_overrides(tiny_llama, data_file, out)
    one_error_line(run_script("finetune.py", "--config", DEMO, *over), str(out / ".lock"), "symlink")
    one_error_line(run_script("dataset.py", "--config", DEMO, *over), str(out / ".lock"))
    with pytest.raises(UserError, match="symlink"):
        RunLock(out, "test").acquire()
    assert notes.read_text() == "my notes\n"

    # A regular .lock of the user's (not "<pid> <stage>") is truncated by no one either.
    (out / ".lock").unlink()
    (out / ".lock").write_text("do not delete\n")
    one_error_line(run_script("finetune.py", "--config", DEMO, *over), str(out / ".lock"), "not written by")
    with pytest.raises(UserError, match="not written by"):
        RunLock(out, "test").acquire()
    assert (out / ".lock").read_text() == "do not delete\n"


def test_an_atomic_write_never_writes_through_a_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    target = tmp_path / "run" / "plan.json"
    target.parent.mkdir()
    target.with_name(f".{target.name}.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write_text(target, "new\n")
    assert victim.read_text() == "keep\n" and target.read_text() == "new\n"


def test_a_copied_run_resumes_itself_and_the_original_is_untouched(tmp_path, trained):
    copy = tmp_path / "r0copy"
    shutil.copytree(trained, copy, symlinks=True)
    before = tree_digest(trained)
    r = run_script("finetune.py", "--config", str(copy / "config.yaml"), "--resume", "train.max_steps=4")
    assert r.returncode == 0, r.stderr
    assert "the run has moved" in r.stderr
    assert tree_digest(trained) == before
    steps = [json.loads(x).get("step") for x in (copy / "train_log.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4
    assert (copy / "checkpoints" / "checkpoint-4").is_dir()
    assert load_config(copy / "config.yaml").paths.output_dir == str(copy)
    # The summary's mean loss is over every step of the run (one logged a step here), not diluted by the resume.
    losses = [json.loads(x)["loss"] for x in (copy / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4
    mean = json.loads((copy / "run_summary.json").read_text())["train_loss_mean"]
    assert mean == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_the_users_dataset_report_in_a_new_folder_is_left_alone(tmp_path, tiny_llama, data_file, trained):
    out = tmp_path / "fresh"
    out.mkdir()
    mine = out / "dataset_report.json"
    mine.write_text('{"my": "own notes"}\n')
    over = tiny_overrides(tiny_llama, data_file, out)
    one_error_line(run_script("finetune.py", "--config", DEMO, *over), "dataset_report.json", "new folder")
    assert mine.read_text() == '{"my": "own notes"}\n'
    # dataset.py's own report is what a new run may replace: the folder is still accepted with it.
    shutil.copy(trained / "dataset_report.json", mine)
    from ftkit.runlock import check_run_target

    check_run_target(out, overwrite=False, resume=False)


def test_the_users_gguf_at_outfile_is_left_alone_and_ours_is_replaced(tmp_path, tiny_llama):
    import gguf

    mine = tmp_path / "my-downloaded-llama.gguf"
    w = gguf.GGUFWriter(mine, "llama")
    w.add_name("someone else's model")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    kept = mine.read_bytes()
    r = run_script("export_gguf.py", "--model", str(tiny_llama), "--outfile", str(mine))
    one_error_line(r, "--outfile", str(mine), "GGUF file export_gguf.py did not write")
    assert mine.read_bytes() == kept

    ours = tmp_path / "out" / "tiny-f16.gguf"
    for _ in range(2):  # the second export replaces the first: export_gguf.py wrote it
        r = run_script("export_gguf.py", "--model", str(tiny_llama), "--outfile", str(ours))
        assert r.returncode == 0, r.stderr
    assert gguf.GGUFReader(ours).fields["ftkit.writer"].contents() == "export_gguf.py"


def test_saved_files_keep_what_was_asked_and_only_display_is_redacted(trained, tiny_llama, monkeypatch):
    from ftkit.prompts import PromptTemplate

    cfg = load_config(trained / "config.yaml")
    assert cfg.model.name_or_path == str(tiny_llama) and Path(cfg.paths.output_dir) == trained
    assert cfg.data.system_prompt == f"Use {TOKEN_LIKE}."
    assert PromptTemplate.load(trained / "prompt_template.json").system_prompt == f"Use {TOKEN_LIKE}."
    assert "***" not in (trained / "config.yaml").read_text()
    # The manifest records the command for people: shown, not read back, so it stays redacted.
    assert TOKEN_LIKE not in (trained / "manifest.json").read_text()

    monkeypatch.setenv("HF_TOKEN", "models")  # too short to be a hub token: starring it garbles every path shown
    assert redact("runs/models/r0") == "runs/models/r0"
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-123")
    assert redact(f"x s3cr3t-value-123 {TOKEN_LIKE}") == "x *** hf_***"


# -- silently wrong results ----------------------------------------------------------------------------------------
def convo(flag) -> dict:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": flag}]}


@pytest.mark.parametrize("flag", [False, 0, 0.0])
def test_a_turn_marked_zero_is_masked(flag):
    d = load_config(DEMO).data
    assert clean_conversation(convo(flag), d, "messages", "row 1")["messages"][1]["train"] is False


@pytest.mark.parametrize("flag", [True, 1, None])
def test_a_turn_marked_one_is_trained(flag):
    d = load_config(DEMO).data
    assert "train" not in clean_conversation(convo(flag), d, "messages", "row 1")["messages"][1]


@pytest.mark.parametrize("flag", ["false", "no", 2, [0]])
def test_a_turn_flag_that_is_not_a_boolean_is_refused(flag):
    d = load_config(DEMO).data
    with pytest.raises(UserError, match=r'row 1 turn 2 has "train": .*write true or false'):
        clean_conversation(convo(flag), d, "messages", "row 1")


def test_sources_that_overlap_share_no_row_between_train_and_eval(tmp_path, data_file):
    part = tmp_path / "part.json"
    part.write_text(json.dumps(json.loads(data_file.read_text())[:10]))
    over = [
        f"data.path=[{{path: {data_file}}}, {{path: {part}}}, {{path: {data_file}, max_rows: 5}}]",
        "data.eval_size=6",
    ]
    train, held, st, _ = load_clean_split(load_config(DEMO, over).data)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert st.shared == 15 and [m["shared_rows"] for m in st.mix] == [0, 10, 5]
    assert [m["kept"] for m in st.mix] == [24, 0, 0] and len(train) + len(held) == 24


def adapter_copy(trained: Path, tmp_path: Path) -> Path:
    """The trained run copied to a folder of its own, which merge_adapter.py then acts on (a moved run)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def test_an_adapter_of_another_type_is_refused(tmp_path, trained):
    run = adapter_copy(trained, tmp_path)
    cfg_file = run / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "peft_type": "LOHA"}))
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    one_error_line(r, 'peft_type "LOHA"', str(cfg_file))
    assert not (run / "merged").exists()


def test_an_adapter_whose_tensors_match_nothing_is_refused(tmp_path, trained):
    from safetensors.torch import load_file, save_file

    run = adapter_copy(trained, tmp_path)
    f = run / "adapter" / "adapter_model.safetensors"
    save_file({k.replace("self_attn", "attn"): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    one_error_line(r, "does not load completely", "match no module")
    assert not (run / "merged").exists()


def test_a_merge_that_changes_nothing_fails(tmp_path, trained):
    from safetensors.torch import load_file, save_file

    run = adapter_copy(trained, tmp_path)
    f = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(f)
    save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    one_error_line(r, "changes nothing", str(run / "adapter"))
    assert not (run / "merged").exists()

    shutil.copy(trained / "adapter" / "adapter_model.safetensors", f)  # the trained adapter merges
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr
    check = json.loads((run / "merged" / "merge_check.json").read_text())
    assert check["max_logit_diff_from_base"] > 0


# -- unclear messages ----------------------------------------------------------------------------------------------
def test_a_lock_released_in_order_is_not_reported_as_taken_over(tmp_path, caplog):
    with RunLock(tmp_path, "first.py"):
        pass
    assert (tmp_path / ".lock").read_bytes() == b""
    with caplog.at_level("INFO", logger="ftkit"), RunLock(tmp_path, "second.py"):
        pass
    assert "taking over" not in caplog.text

    # A pid left by a killed holder whose number a live process has since taken is not called "no longer running".
    (tmp_path / ".lock").write_text(f"{os.getppid()} killed.py\n")
    with caplog.at_level("INFO", logger="ftkit"), RunLock(tmp_path, "third.py"):
        pass
    assert f"from pid {os.getppid()}, which stopped without releasing it" in caplog.text
    assert "no longer running" not in caplog.text


# -- round 4: silently wrong ---------------------------------------------------------------------------------------
def test_conversations_without_an_assistant_turn_are_not_held_out(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from ftkit.data import prepare
    from ftkit.scoring import held_out_row

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(8)
    ]
    rows += [{"messages": [{"role": "user", "content": f"only a question {i}"}]} for i in range(8)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(DEMO, [f"model.name_or_path={tiny_llama}", f"data.path={data}", "data.eval_size=8"])
    loaded = load_clean_split(cfg.data)
    assert any(len(r["messages"]) == 1 for r in loaded[1])  # the split did hold some out
    prep = prepare(cfg, AutoTokenizer.from_pretrained(tiny_llama), loaded)
    assert prep.eval_records and all(len(r["messages"]) == 2 for r in prep.eval_records)
    for k, r in enumerate(prep.eval_records, 1):
        held_out_row(r, f"line {k}")  # what evaluate.py reads back from eval_rows.jsonl


# -- round 4: tracebacks become one line -----------------------------------------------------------------------------
def test_an_unwritable_lock_is_refused_before_any_work(tmp_path, tiny_llama, data_file, monkeypatch):
    """An immutable (chattr +i) or read-only .lock: refused by the first check, not after the model loaded."""
    real_open = os.open

    def refusing_open(path, flags, *a, **kw):
        if Path(path).name == ".lock" and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_open(path, flags, *a, **kw)

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    monkeypatch.setattr(os, "open", refusing_open)
    over = tiny_overrides(tiny_llama, data_file, out)
    for script in ("dataset.py", "finetune.py"):
        one_error_line(run_script(script, "--config", DEMO, *over), "cannot open the run's lock", "chattr -i")
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize(
    "code, words",
    [(28, "No space left on device"), (30, "Read-only file system"), (13, "Permission denied"), (36, "too long")],
)
def test_a_full_or_read_only_disk_in_dataset_is_one_line_and_leaves_no_folder(
    tmp_path, tiny_llama, data_file, monkeypatch, code, words
):
    import ftkit.paths

    def failing_write(path, *a, **kw):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ftkit.paths, "atomic_write_json", failing_write)
    out = tmp_path / "new"
    r = run_script("dataset.py", "--config", DEMO, *tiny_overrides(tiny_llama, data_file, out))
    one_error_line(r, words, str(out / "dataset_report.json"))
    assert not out.exists()


def test_a_full_disk_when_the_adapter_is_saved_is_one_line_and_the_run_resumes(tmp_path, trained, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def full(self, *a, **kw):
        raise OSError(28, "No space left on device", str(a[0]) if a else None)

    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    r = run_script("finetune.py", "--config", str(run / "config.yaml"), "--resume", "train.max_steps=3")
    one_error_line(r, "No space left on device", "free space")
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and (run / "adapter").is_dir()


def test_a_resume_whose_optimizer_state_needs_an_unsafe_load_is_refused_unloaded(tmp_path, trained):
    import argparse

    import torch

    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    opt = run / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "extra": argparse.Namespace(note="not ours")}, opt)
    r = run_script("finetune.py", "--config", str(run / "config.yaml"), "--resume", "train.max_steps=4")
    line = one_error_line(r, str(opt), "not a file this project wrote", "argparse.Namespace")
    assert "weights_only" not in r.stderr and "checkpoint-4" not in str(list(run.rglob("*")))
    assert "Move" in line


def test_a_sigterm_landing_as_a_stage_returns_ends_as_terminated(monkeypatch):
    """The signal delivered just as run_main restores the SIGTERM handler (an export has just finished)."""
    import signal

    from ftkit import cli

    real, calls = signal.signal, []

    def lands_on_restore(sig, handler):
        calls.append(handler)
        if sig == signal.SIGTERM and len(calls) == 2:
            cli._terminated(sig, None)
        return real(sig, handler)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(signal, "signal", lands_on_restore)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda argv: 0, [])
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# -- round 4: templates --------------------------------------------------------------------------------------------
def long_conversation(turns: int, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(turns // 2):
        msgs += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return msgs


@pytest.mark.parametrize("name", ["chatml", "alpaca", "chat"])
def test_a_long_conversation_is_cut_in_one_pass_exactly_as_turn_by_turn(tiny_llama, monkeypatch, name):
    from transformers import AutoTokenizer

    import ftkit.prompts
    from ftkit.prompts import PromptTemplate

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    t = PromptTemplate.from_config(name, tok, system_prompt="You help.", conversations=True)
    convs = [long_conversation(8), long_conversation(9, system=True), long_conversation(12)]
    convs[2][3]["train"] = False
    one_pass = [t.pieces(tok, t.with_system(c)) for c in convs]
    monkeypatch.setattr(ftkit.prompts, "ONE_PASS_TURNS", 10**9)
    assert one_pass == [t.pieces(tok, t.with_system(c)) for c in convs]


def test_a_conversation_of_5000_turns_takes_linear_time(tiny_llama):
    """Measured on the 2-core CI machine: 9.1 s turn by turn (two renders for each assistant turn, each as long
    as the conversation so far), 0.09 s in one pass."""
    import time

    from transformers import AutoTokenizer

    from ftkit.prompts import PromptTemplate, encode_conversations

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    t = PromptTemplate.from_config("chatml", tok, conversations=True)
    t0 = time.perf_counter()
    ids, labels, status = encode_conversations(t, tok, [long_conversation(5000)], 10**6)[0]
    assert time.perf_counter() - t0 < 2.0
    assert status == "ok" and len(ids) == len(labels) > 5000


def test_a_template_that_loops_without_end_is_stopped(tmp_path, tiny_llama, data_file, monkeypatch):
    import time

    import ftkit.templating

    monkeypatch.setattr(ftkit.templating, "RENDER_SECONDS", 0.5)
    hang = tmp_path / "hang.jinja"
    hang.write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    over = tiny_overrides(tiny_llama, data_file, tmp_path / "run", **{"data.prompt_template": hang})
    t0 = time.perf_counter()
    one_error_line(run_script("dataset.py", "--config", DEMO, *over), str(hang), "ran for more than 0.5 s")
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "run").exists()


# -- round 4: unclear messages -------------------------------------------------------------------------------------
def test_an_override_after_a_flag_is_an_override():
    from ftkit.cli import build_parser, parse_args

    p = build_parser("test")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--prompt")
    p.add_argument("--adapter", nargs="?", const=True)
    a = parse_args(p, ["--config", "c.yaml", "train.max_steps=3", "--resume", "train.save_steps=2", "--adapter"])
    assert a.resume and a.adapter is True and a.overrides == ["train.max_steps=3", "train.save_steps=2"]
    a = parse_args(p, ["--prompt", "train.max_steps=3", "--adapter", "inference.do_sample=false"])
    assert a.prompt == "train.max_steps=3" and a.adapter is True and a.overrides == ["inference.do_sample=false"]
    a = parse_args(p, ["--train.max_steps", "5", "lora.r=8", "--train.max_steps=6"])
    assert a.overrides == ["train.max_steps=5", "lora.r=8", "train.max_steps=6"]


# -- round 4: the server -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host, key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "s3cret-key", False), ("127.0.0.1", None, False)]
)
def test_serving_beyond_loopback_without_an_api_key_warns(tmp_path, monkeypatch, caplog, host, key, warned):
    pytest.importorskip("llama_cpp.server.app")
    import llama_cpp.server.app
    import uvicorn

    import ftkit.llamacpp as lc

    seen = {}
    monkeypatch.setattr(lc, "require", lambda what: None)
    monkeypatch.setattr(
        llama_cpp.server.app,
        "create_app",
        lambda server_settings, model_settings: seen.update(api_key=server_settings.api_key),
    )
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    with caplog.at_level("WARNING", logger="ftkit"):
        lc.serve(tmp_path / "m.gguf", None, host, free_port(), 2048, "m", {}, key)
    assert seen["api_key"] == key
    assert ("without an API key" in caplog.text) == warned
    assert lc.loopback_only("::1") and lc.loopback_only("localhost") and not lc.loopback_only("example.org")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("state", ['{"a": 1}', "[1]", '{"global_step": "2"}', '{"global_step": true}'])
def test_a_trainer_state_that_is_not_the_trainers_marks_the_checkpoint_incomplete(tmp_path, trained, state):
    from ftkit.checkpoints import checkpoint_missing, complete_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text(state)
    assert "trainer_state.json (cut off, or not the Trainer's)" in checkpoint_missing(
        run / "checkpoints" / "checkpoint-2"
    )
    assert complete_checkpoints(run / "checkpoints") == []


def test_a_resume_never_writes_through_a_linked_checkpoints_folder(tmp_path, trained):
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(trained, run, symlinks=True)
    shutil.copytree(trained, other, symlinks=True)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other / "checkpoints")
    before = tree_digest(other)
    r = run_script("finetune.py", "--config", str(run / "config.yaml"), "--resume", "train.max_steps=4")
    one_error_line(r, str(run / "checkpoints"), "is a symlink")
    assert tree_digest(other) == before
