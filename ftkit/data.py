"""Alpaca data: load records (local JSON/JSONL/CSV/Parquet or a hub dataset), check and clean them, split
train/eval with a seed, render prompts, tokenize with the prompt masked from the loss, and the report."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import UserError, user_errors
from .config import Config, DataCfg
from .jsonl import fail_if_bad, parse_jsonl, read_text
from .models import hub_mode
from .paths import file_sha256
from .prompts import IGNORE_INDEX, PromptTemplate

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# -- loading ---------------------------------------------------------------------------------------
def _read_json(p: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file "
            "(a .jsonl file holds one JSON object per line)"
        ) from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}, as some exports write
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{p}: expected a JSON list of records, got an object; store a list of "
                "{instruction, input, output} objects"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


class Records(list):
    """Rows as read, with the file line each came from (JSONL, CSV) so errors can name it."""

    lines: list[int] | None = None


def _read_jsonl(p: Path, text: str) -> list:
    pairs, bad = parse_jsonl(p, text)
    fail_if_bad(p, bad)
    rows = Records(v for _, v in pairs)
    rows.lines = [n for n, _ in pairs]
    return rows


def _read_csv(p: Path, text: str) -> list:
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = Records()
    rows.lines = []
    try:
        for r in reader:
            # DictReader files surplus cells under None and fills missing ones with None.
            if None in r or any(v is None for v in r.values()):
                raise UserError(
                    f"{p}: malformed CSV on line {reader.line_num}: it has "
                    f"{'more' if None in r else 'fewer'} cells than the header "
                    f"({', '.join(reader.fieldnames or [])}); quote cells that hold commas"
                )
            rows.append(r)
            rows.lines.append(reader.line_num)
    except csv.Error as e:
        raise UserError(f"{p}: malformed CSV on line {reader.line_num} ({e}); fix the quoting") from None
    return rows


def load_records(d: DataCfg) -> tuple[list[dict], str]:
    """Records as dicts, and a hash of their source for the run manifest."""
    p = Path(d.path).expanduser()
    if p.suffix.lower() in LOCAL_SUFFIXES or p.exists():
        fix = "point data.path at a .json/.jsonl/.csv/.parquet file"
        if p.is_dir() or not p.is_file():
            read_text(p, "data.path", fix)  # the one wording for a folder or a missing file
        suffix = p.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(f"'{p}' has an unsupported extension; use one of {', '.join(LOCAL_SUFFIXES)}")
        digest = file_sha256(p)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(p).to_pylist(), digest
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise UserError(f"{p}: not a readable parquet file ({e}); re-export it") from None
        text = read_text(p, "data.path", fix)
        if not text.strip():
            raise UserError(f"{p}: the file is empty; point data.path at a file of instruction/output rows")
        if suffix == ".csv":
            return _read_csv(p, text), digest
        if suffix == ".jsonl" or (suffix == ".json" and text.lstrip()[:1] == "{" and "\n{" in text.strip()):
            return _read_jsonl(p, text), digest
        return _read_json(p, text), digest
    # A hub dataset id.
    offline = hub_mode(d.path, "dataset", "data.path")
    import datasets

    # datasets raises many types; the user needs the message, not the class
    with user_errors(
        f"cannot load dataset '{d.path}' (split {d.split})",
        "fix data.path or point it at a local .json/.jsonl file",
        (Exception,),
    ):
        ds = datasets.load_dataset(
            d.path,
            split=d.split,
            download_mode=None,
            **({"download_config": datasets.DownloadConfig(local_files_only=True)} if offline else {}),
        )
    return [dict(r) for r in ds], hashlib.sha256(f"{d.path}@{ds._fingerprint}".encode()).hexdigest()


@dataclass
class CleanStats:
    rows_in: int = 0
    empty_output: int = 0
    duplicates: int = 0
    kept: int = 0


def clean_records(records: list, d: DataCfg, source: str) -> tuple[list[dict], CleanStats]:
    """Check every row; rows only partly bad (empty output, duplicates) follow the config's policy."""
    st = CleanStats(rows_in=len(records))
    if not records:
        raise UserError(f"dataset '{source}' has no rows; point data.path at a non-empty file")
    out, seen = [], set()
    lines = getattr(records, "lines", None)
    for i, r in enumerate(records, 1):
        at = f"line {lines[i - 1]}" if lines else f"row {i}"
        if not isinstance(r, dict):
            raise UserError(f"{source}: {at} is a {type(r).__name__}, not an object with instruction/output")
        for key in ("instruction", "output"):
            if key not in r:
                have = ", ".join(sorted(map(str, r))) or "nothing"
                raise UserError(
                    f"{source}: {at} has no '{key}' field (it has: {have}); Alpaca rows need "
                    "instruction, output and optionally input"
                )
        for key in ("instruction", "input", "output"):
            v = r.get(key)
            if v is None and key != "input":
                raise UserError(f"{source}: {at} field '{key}' is null; give it text, or delete the row")
            if v is not None and not isinstance(v, str):
                raise UserError(f"{source}: {at} field '{key}' is {type(v).__name__}, not text; store it as a string")
        inst, inp, outp = r["instruction"].strip(), (r.get("input") or "").strip(), r["output"].strip()
        if not inst:
            raise UserError(f"{source}: {at} has an empty instruction; fill it in or delete the row")
        if not outp:
            st.empty_output += 1
            if d.empty_output == "fail":
                raise UserError(
                    f"{source}: {at} has an empty output; fill it in, delete it, or set data.empty_output=drop"
                )
            continue
        key = (inst, inp, outp)
        if key in seen and d.drop_duplicates:
            st.duplicates += 1
            continue
        seen.add(key)
        out.append(
            {
                **{k: v for k, v in r.items() if k not in ("instruction", "input", "output")},
                "instruction": inst,
                "input": inp,
                "output": outp,
            }
        )
    if d.max_samples:
        out = out[: d.max_samples]
    st.kept = len(out)
    if not out:
        raise UserError(
            f"{source}: no usable rows left ({st.empty_output} empty outputs, {st.duplicates} "
            "duplicates); check the file"
        )
    return out, st


def split_records(rows: list[dict], eval_size: float, seed: int, note: str = "") -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle, then hold out `eval_size` rows (a fraction if < 1, else a count)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = int(round(eval_size * len(rows))) if eval_size < 1 else int(eval_size)
    if eval_size > 0:
        n_eval = max(1, n_eval)
    if n_eval >= len(rows):
        raise UserError(f"data.eval_size={eval_size} leaves no training rows out of {len(rows)}{note}; lower it")
    ev = [rows[i] for i in idx[:n_eval]]
    tr = [rows[i] for i in idx[n_eval:]]
    return tr, ev


# -- tokenization ----------------------------------------------------------------------------------
@dataclass
class Encoded:
    rows: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped_too_long: int = 0
    fully_masked: int = 0


def encode_rows(rows: list[dict], template: PromptTemplate, tok, d: DataCfg, source: str) -> Encoded:
    enc = Encoded()
    for r in rows:
        ids, labels, status = template.encode(tok, r["instruction"], r["input"] or None, r["output"], d.max_length)
        if status == "fully_masked":
            # The prompt alone fills max_length: nothing would be learned from this row.
            enc.fully_masked += 1
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a row's prompt alone exceeds data.max_length={d.max_length} "
                    f"(instruction starts {r['instruction'][:40]!r}); raise data.max_length or "
                    "set data.too_long=drop"
                )
            continue
        if status == "truncated":
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a row is longer than data.max_length={d.max_length} tokens "
                    f"(instruction starts {r['instruction'][:40]!r}); raise data.max_length or "
                    "set data.too_long=drop|truncate"
                )
            if d.too_long == "drop":
                enc.dropped_too_long += 1
                continue
            enc.truncated += 1
        enc.rows.append({"input_ids": ids, "labels": labels})
        enc.lengths.append(len(ids))
    return enc


def histogram(lengths: list[int], bins: int = 10) -> list[dict[str, int]]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // width for n in lengths)
    return [
        {"from": lo + b * width, "to": lo + (b + 1) * width - 1, "rows": counts.get(b, 0)}
        for b in range(-(-(hi - lo + 1) // width))
    ]


def show_example(tok, ids: list[int], labels: list[int]) -> dict[str, str]:
    """The rendered text, and the same text with masked (prompt) tokens shown as '·'."""
    text = tok.decode(ids)
    trained = "".join(tok.decode([t]) if lbl != IGNORE_INDEX else "·" for t, lbl in zip(ids, labels))
    return {"text": text, "trained_on": trained}


@dataclass
class Prepared:
    train: Encoded
    eval: Encoded
    eval_records: list[dict]
    template: PromptTemplate
    report: dict
    data_hash: str


def load_clean_split(d: DataCfg) -> tuple[list[dict], list[dict], CleanStats, str]:
    """Read, check and split the rows: every data error that needs no tokenizer, in a second."""
    records, digest = load_records(d)
    rows, st = clean_records(records, d, d.path)
    note = (
        f" ({st.duplicates} duplicate rows were dropped; data.drop_duplicates=false keeps them)"
        if st.duplicates
        else ""
    )
    train_rows, eval_rows = split_records(rows, d.eval_size, d.seed, note)
    return train_rows, eval_rows, st, digest


def prepare(cfg: Config, tok, loaded: tuple | None = None) -> Prepared:
    """Everything finetune needs from the data, plus the report that dataset.py prints. `loaded`: what
    load_clean_split(cfg.data) returned, when the caller checked the data already."""
    d = cfg.data
    train_rows, eval_rows, st, digest = loaded or load_clean_split(d)
    template = PromptTemplate.from_config(d.prompt_template, tok, d.system_prompt)
    tr = encode_rows(train_rows, template, tok, d, d.path)
    ev = encode_rows(eval_rows, template, tok, d, d.path)
    if not tr.rows:
        raise UserError(
            f"no training rows left after applying data.too_long={d.too_long} at data.max_length="
            f"{d.max_length}; raise data.max_length"
        )
    n_tokens = [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in tr.rows]
    report = {
        "source": d.path,
        "data_sha256": digest,
        "prompt_template": d.prompt_template,
        "max_length": d.max_length,
        "rows_in_file": st.rows_in,
        "empty_output": st.empty_output,
        "duplicates": st.duplicates,
        "rows_kept": st.kept,
        "train_rows": len(tr.rows),
        "eval_rows": len(ev.rows),
        "truncated": tr.truncated + ev.truncated,
        "dropped_too_long": tr.dropped_too_long + ev.dropped_too_long,
        "fully_masked": tr.fully_masked + ev.fully_masked,
        "policy": {"too_long": d.too_long, "empty_output": d.empty_output, "drop_duplicates": d.drop_duplicates},
        "train_tokens": sum(tr.lengths),
        "train_response_tokens": sum(n_tokens),
        "mean_length": round(sum(tr.lengths) / len(tr.lengths), 1),
        "max_length_seen": max(tr.lengths),
        "length_histogram": histogram(tr.lengths + ev.lengths),
        "examples": [show_example(tok, r["input_ids"], r["labels"]) for r in tr.rows[:2]],
    }
    eval_kept = [r for r in eval_rows]  # raw held-out rows: evaluate.py generates from them
    return Prepared(tr, ev, eval_kept, template, report, digest)


def print_report(rep: dict) -> None:
    print(f"dataset {rep['source']}  ({rep['prompt_template']} template, max_length {rep['max_length']})")
    print(
        f"  rows in file {rep['rows_in_file']}, kept {rep['rows_kept']} -> train {rep['train_rows']}, "
        f"eval {rep['eval_rows']}"
    )
    print(
        f"  empty output {rep['empty_output']}, duplicates {rep['duplicates']}, truncated {rep['truncated']}, "
        f"dropped as too long {rep['dropped_too_long']}, fully masked {rep['fully_masked']}"
    )
    print(
        f"  train tokens {rep['train_tokens']} (response {rep['train_response_tokens']}), mean length "
        f"{rep['mean_length']}, longest {rep['max_length_seen']}"
    )
    print("  token lengths:")
    top = max((b["rows"] for b in rep["length_histogram"]), default=1) or 1
    for b in rep["length_histogram"]:
        print(f"    {b['from']:>5}-{b['to']:<5} {b['rows']:>6} {'#' * round(40 * b['rows'] / top)}")
    for i, ex in enumerate(rep["examples"], 1):
        print(
            f"\n  example {i}, as rendered:\n{ex['text']}\n  example {i}, trained-on tokens ('·' = masked):\n"
            f"{ex['trained_on']}"
        )
