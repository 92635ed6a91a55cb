"""Prompt rendering and label masking on fixtures: what the model is trained on, token by token."""

import json
import shutil

import pytest
from helpers import run_script, tiny_overrides

from ftkit.config import DataCfg
from ftkit.data import clean_records, encode_rows, load_records, split_records
from ftkit.errors import UserError
from ftkit.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE_INDEX, PromptTemplate


@pytest.fixture(scope="module")
def tok(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def test_alpaca_prompt_with_and_without_input(tok):
    t = PromptTemplate.from_config("alpaca", tok)
    with_input = t.render_prompt(tok, "Add the numbers.", "2 and 3")
    without = t.render_prompt(tok, "Name a color.")
    assert with_input == ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert "### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert without == ALPACA_NO_INPUT.format(instruction="Name a color.")
    assert "### Input" not in without


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_labels_mask_prompt_and_train_answer_plus_eos(tok, kind):
    t = PromptTemplate.from_config(kind, tok)
    ids, labels, status = t.encode(tok, "Reverse the word.", "abc", "cba", max_length=256)
    prompt = t.prompt_ids(tok, "Reverse the word.", "abc")
    assert status == "ok" and len(ids) == len(labels)
    assert ids[: len(prompt)] == prompt
    assert all(lbl == IGNORE_INDEX for lbl in labels[: len(prompt)])
    trained = [i for i, lbl in zip(ids, labels) if lbl != IGNORE_INDEX]
    assert trained == ids[len(prompt) :]
    # The answer, then the token that ends it: what teaches the model to stop.
    assert tok.decode(trained, skip_special_tokens=True).strip() == "cba"
    assert trained[-1] in t.stop_token_ids and tok.eos_token_id in t.stop_token_ids


def test_chat_template_is_the_tokenizers_own(tok):
    t = PromptTemplate.from_config("chat", tok, system_prompt="Be brief.")
    text = t.render_prompt(tok, "Hi")
    assert text == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert t.chat_template == tok.chat_template


def test_template_round_trips_through_json(tok, tmp_path):
    t = PromptTemplate.from_config("chat", tok)
    p = tmp_path / "pt.json"
    p.write_text(json.dumps(t.to_json()))
    assert PromptTemplate.load(p) == t


def test_too_long_policies(tok):
    rows = [{"instruction": "Say it.", "input": "", "output": "word " * 200}]
    t = PromptTemplate.from_config("alpaca", tok)
    d = DataCfg(max_length=64, too_long="drop")
    enc = encode_rows(rows, t, tok, d, "x")
    assert enc.rows == [] and enc.dropped_too_long == 1
    enc = encode_rows(rows, t, tok, DataCfg(max_length=64, too_long="truncate"), "x")
    assert enc.truncated == 1 and len(enc.rows[0]["input_ids"]) == 64
    with pytest.raises(UserError, match="longer than data.max_length"):
        encode_rows(rows, t, tok, DataCfg(max_length=64, too_long="fail"), "x")
    long_prompt = [{"instruction": "x " * 100, "input": "", "output": "y"}]
    enc = encode_rows(long_prompt, t, tok, DataCfg(max_length=32, too_long="truncate"), "x")
    assert enc.fully_masked == 1 and enc.rows == []


def test_clean_counts_empty_and_duplicates():
    rows = [
        {"instruction": "a", "output": "1"},
        {"instruction": "a", "output": "1"},
        {"instruction": "b", "output": " "},
        {"instruction": "c", "input": None, "output": "3"},
    ]
    out, st = clean_records(rows, DataCfg(), "f")
    assert [r["instruction"] for r in out] == ["a", "c"] and st.duplicates == 1 and st.empty_output == 1
    with pytest.raises(UserError, match="row 3 has an empty output"):
        clean_records(rows, DataCfg(empty_output="fail"), "f")


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"input": "x", "output": "y"}], "row 1 has no 'instruction'"),
        ([{"instruction": "x"}], "row 1 has no 'output'"),
        ([{"instruction": "x", "output": 3}], "field 'output' is int"),
        ([], "no rows"),
    ],
)
def test_clean_rejects_bad_rows(rows, match):
    with pytest.raises(UserError, match=match):
        clean_records(rows, DataCfg(), "f")


def test_split_is_seeded_and_disjoint():
    rows = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    a = split_records(rows, 0.1, 1)
    assert a == split_records(rows, 0.1, 1)
    assert a != split_records(rows, 0.1, 2)
    tr, ev = a
    assert len(ev) == 10 and len(tr) == 90
    assert not {r["instruction"] for r in tr} & {r["instruction"] for r in ev}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_formats_load_the_same_rows(tmp_path, suffix):
    rows = [{"instruction": "a", "input": "", "output": "1"}, {"instruction": "b", "input": "x", "output": "2"}]
    p = tmp_path / f"d{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        import csv

        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
    got, digest = load_records(DataCfg(path=str(p)))
    assert got == rows and len(digest) == 64


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    with pytest.raises(UserError, match="line 2"):
        load_records(DataCfg(path=str(p)))


def test_dataset_report_cli(tmp_path, alpaca_file, tiny_llama):
    from helpers import run_script, tiny_overrides

    out = tmp_path / "run"
    r = run_script("dataset.py", "--config", "configs/demo.yaml", *tiny_overrides(tiny_llama, alpaca_file, out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["rows_in_file"] == 32 and rep["train_rows"] + rep["eval_rows"] == 32
    assert rep["length_histogram"] and len(rep["examples"]) == 2
    assert "trained-on tokens" in r.stdout and "token lengths" in r.stdout


def test_transformers_warnings_are_shown_and_quiet_hides_them(tmp_path, tiny_llama, alpaca_file):
    """transformers warns that it ignores a byte-level BPE tokenizer's clean_up_tokenization_spaces=True (a
    setting it overrides): shown by default, as the library prints it; --quiet hides it and keeps the stage's own
    output. The setting is written here: SmolLM2's tokenizer had it as transformers 5.17 converted it from the
    GGUF, not as the rewritten converter of 5.24 on does."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(cfg | {"clean_up_tokenization_spaces": True}))
    args = ["--config", "configs/demo.yaml", *tiny_overrides(model, alpaca_file, tmp_path / "run")]
    # Real processes: transformers prints this warning once per process (warning_once).
    shown = run_script("dataset.py", *args, process=True)
    quiet = run_script("dataset.py", *args, "--quiet", process=True)
    assert shown.returncode == 0 and quiet.returncode == 0, shown.stderr + quiet.stderr
    assert "[transformers] Ignoring clean_up_tokenization_spaces" in shown.stderr
    assert "[transformers]" not in quiet.stderr and "clean_up_tokenization" not in quiet.stderr
    assert "rows in file" in quiet.stdout and "INFO wrote" in quiet.stderr
