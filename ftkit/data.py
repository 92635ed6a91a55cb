"""Training data: load records (local JSON/JSONL/CSV/Parquet or a hub dataset) in Alpaca, OpenAI `messages` or
ShareGPT format (data.format, data.columns), check and clean them, split train/eval with a seed, render
prompts, tokenize with everything but the answers masked from the loss, and the report."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import log
from .config import Config, DataCfg
from .errors import UserError, user_errors
from .jsonl import check_text, fail_if_bad, loads, parse_jsonl, read_text
from .models import hub_mode
from .paths import combined_hash, file_sha256
from .prompts import IGNORE_INDEX, PromptTemplate, encode_conversations

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# -- loading ---------------------------------------------------------------------------------------
def _read_json(p: Path, text: str) -> list:
    try:
        data = loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file "
            "(a .jsonl file holds one JSON object per line)"
        ) from None
    if isinstance(data, dict) and {"messages", "conversations", "instruction"} & data.keys():
        data = [data]  # one row: a conversation saved on its own (the chat REPL's /save)
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
    if "\\u" in text:  # only an escape can make a surrogate in JSON read as UTF-8
        for i, r in enumerate(data, 1):
            check_text(r, f"{p}: row {i}", "fix the text or delete the row")
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
    format: str = "alpaca"
    mix: list[dict] | None = None  # per data.path entry, when there are several
    shared: int = 0  # rows dropped from a data.path entry because an earlier entry holds them


# The list field of each conversation format, and the names its turns' roles go by. ShareGPT exports use
# human/gpt; other tools write user/assistant, bot or model (Gemma) in the same files.
CONVERSATION_KEYS = {"messages": "messages", "sharegpt": "conversations"}
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
}


def detect_format(records: list, d: DataCfg, source: str) -> str:
    """data.format, or for "auto" the format of the first rows (logged, since it decides how every row is read)."""
    if d.format != "auto":
        return d.format
    # A mapping names the format's own fields: it says the format even when the mapped field is missing, so
    # that the error is about the mapping rather than an unknown format.
    by_columns = {
        "messages" if k == "messages" else "sharegpt" if k == "conversations" else "alpaca"
        for k in d.columns
        if k != "system"
    }
    if len(by_columns) == 1:
        fmt = by_columns.pop()
        log.info("data.format=auto: reading %s as %s rows (from data.columns)", source, fmt)
        return fmt
    col = {k: d.columns.get(k, k) for k in ("instruction", "output", "messages", "conversations")}
    for r in records[:5]:
        if not isinstance(r, dict):
            continue
        if isinstance(r.get(col["messages"]), list):
            fmt = "messages"
        elif isinstance(r.get(col["conversations"]), list):
            fmt = "sharegpt"
        elif col["instruction"] in r or col["output"] in r:
            fmt = "alpaca"
        else:
            continue
        log.info("data.format=auto: reading %s as %s rows (from its first rows' fields)", source, fmt)
        return fmt
    first = next((r for r in records[:5] if isinstance(r, dict)), None)
    if first is None:
        return "alpaca"  # rows that are not objects at all: the row check names the first one
    have = ", ".join(sorted(map(str, first))) or "nothing"
    raise UserError(
        f"{source}: cannot tell the format from the first rows (they have: {have}); set data.format "
        "(alpaca, messages or sharegpt) and, for other field names, data.columns (e.g. "
        "data.columns={instruction: question, output: answer})"
    )


def _renamed(r: dict, d: DataCfg, keys: tuple[str, ...], at: str, source: str) -> dict:
    """The row with data.columns' fields under the names this project uses; a mapped field the row lacks is
    an error naming the mapping, since the mapping is the likelier mistake."""
    out = dict(r)
    for key in keys:
        col = d.columns.get(key)
        if col is None or col == key:
            continue
        if col not in r:
            have = ", ".join(sorted(map(str, r))) or "nothing"
            raise UserError(
                f"{source}: {at} has no '{col}' field, which data.columns maps to {key} (it has: {have}); "
                "fix data.columns"
            )
        out[key] = out.pop(col)
    return out


def clean_records(records: list, d: DataCfg, source: str) -> tuple[list[dict], CleanStats]:
    """Check every row; rows only partly bad (empty output, duplicates) follow the config's policy."""
    if not records:
        raise UserError(f"dataset '{source}' has no rows; point data.path at a non-empty file")
    fmt = detect_format(records, d, source)
    st = CleanStats(rows_in=len(records), format=fmt)
    out, seen = [], set()
    lines = getattr(records, "lines", None)
    for i, r in enumerate(records, 1):
        at = f"line {lines[i - 1]}" if lines else f"row {i}"
        row = _clean_alpaca(r, d, at, source, st) if fmt == "alpaca" else clean_conversation(r, d, fmt, at, source)
        if row is not None and "messages" in row and all(m["role"] == "system" for m in row["messages"]):
            row = _empty_output(d, st, f"{source}: {at} is a conversation without turns")
        if row is None:
            continue
        key = row_key(row)
        if key in seen and d.drop_duplicates:
            st.duplicates += 1
            continue
        seen.add(key)
        out.append(row)
    if d.max_samples:
        out = out[: d.max_samples]
    st.kept = len(out)
    if not out:
        raise UserError(
            f"{source}: no usable rows left ({st.empty_output} empty outputs or conversations, {st.duplicates} "
            "duplicates); check the file"
        )
    return out, st


def row_key(row: dict) -> tuple:
    """What makes two cleaned rows the same example (their text, turn by turn)."""
    if "messages" in row:
        return tuple(
            (m["role"], m["content"], json.dumps(m.get("tool_calls"), sort_keys=True)) for m in row["messages"]
        )
    return (row["instruction"], row["input"], row["output"])


def _clean_alpaca(r, d: DataCfg, at: str, source: str, st: CleanStats) -> dict | None:
    if not isinstance(r, dict):
        raise UserError(f"{source}: {at} is a {type(r).__name__}, not an object with instruction/output")
    r = _renamed(r, d, ("instruction", "input", "output"), at, source)
    for key in ("instruction", "output"):
        if key not in r:
            have = ", ".join(sorted(map(str, r))) or "nothing"
            conv = next((k for k in ("messages", "conversations") if isinstance(r.get(k), list)), None)
            if conv:
                raise UserError(
                    f"{source}: {at} is a {conv} row in a file read as Alpaca (data.format="
                    f"{d.format}{', from the first rows' if d.format == 'auto' else ''}); keep one format "
                    "a file, or list the files apart in data.path"
                )
            raise UserError(
                f"{source}: {at} has no '{key}' field (it has: {have}); Alpaca rows need "
                "instruction, output and optionally input (data.columns maps other names)"
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
        return _empty_output(d, st, f"{source}: {at} has an empty output")
    return {
        **{k: v for k, v in r.items() if k not in ("instruction", "input", "output")},
        "instruction": inst,
        "input": inp,
        "output": outp,
    }


def _empty_output(d: DataCfg, st: CleanStats, what: str) -> None:
    """A row with nothing to learn from: counted and dropped, or refused under data.empty_output=fail."""
    st.empty_output += 1
    if d.empty_output == "fail":
        raise UserError(f"{what}; fill it in, delete it, or set data.empty_output=drop")


def clean_conversation(r, d: DataCfg, fmt: str, at: str, source: str = "") -> dict:
    """A messages or ShareGPT row as {"messages": [{role, content[, train]}], ...the row's other fields}:
    roles normalized, turns checked to alternate user/assistant after an optional first system turn. Errors
    start with `source: at` (just `at` without a source: the caller adds the file)."""
    key = CONVERSATION_KEYS[fmt]
    loc = f"{source}: {at}" if source else at
    if not isinstance(r, dict):
        raise UserError(f"{loc} is a {type(r).__name__}, not an object with a '{key}' list")
    r = _renamed(r, d, (key, "system"), at, source)
    turns = r.get(key)
    if not isinstance(turns, list):
        have = ", ".join(sorted(map(str, r))) or "nothing"
        what = "an Alpaca row" if "instruction" in r else f"a row without a '{key}' list"
        raise UserError(
            f"{loc} is {what} (it has: {have}) in a file read as {fmt} (data.format={d.format}"
            f"{', from the first rows' if d.format == 'auto' else ''}); keep one format a file, or map the "
            f"field with data.columns={{{key}: NAME}}"
        )
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    msgs = []
    if isinstance(r.get("system"), str) and r["system"].strip():  # ShareGPT exports keep it beside the turns
        msgs.append({"role": "system", "content": r["system"].strip()})
    offset = len(msgs)
    for n, t in enumerate(turns, 1):
        where = f"{loc} turn {n}"
        if not isinstance(t, dict):
            raise UserError(f"{where} is a {type(t).__name__}, not an object with {role_key} and {text_key}")
        # Either spelling inside either format: converters mix them.
        rk, tk = (role_key, text_key) if role_key in t else ("role", "content") if "role" in t else ("from", "value")
        role, text = t.get(rk), t.get(tk)
        if role not in ROLES:
            raise UserError(f"{where} has an unknown role {short(role)}; use one of {', '.join(ROLES)}")
        calls = _tool_calls(t, where) if ROLES[role] == "assistant" else None
        if text is None and calls:  # an assistant turn that only calls tools has no text
            text = ""
        if not isinstance(text, str):
            raise UserError(f"{where} ({role}) has no text in '{tk}' (got {type(text).__name__}); store it as a string")
        m = {"role": ROLES[role], "content": text.strip()}
        if calls:
            m["tool_calls"] = calls
        if m["role"] == "tool":  # which call the output answers, for templates that say so
            m |= {k: t[k] for k in ("name", "tool_call_id") if isinstance(t.get(k), str)}
        if not _turn_trained(t, where):
            m["train"] = False
        msgs.append(m)
    _check_turn_order(msgs, loc, offset)
    return {**{k: v for k, v in r.items() if k not in (key, "system")}, "messages": msgs}


def _check_turn_order(msgs: list[dict], loc: str, offset: int) -> None:
    """An optional system turn, then user and assistant turns in turn; an assistant turn that calls tools is
    followed by the tools' outputs (one tool turn or more), then by the assistant's next turn."""
    prev = None
    for n, m in enumerate(msgs):
        if m["role"] == "system" and n == 0:
            continue
        if prev == "assistant" and msgs[n - 1].get("tool_calls"):
            want = {"tool"}
        else:
            want = {"tool", "assistant"} if prev == "tool" else {"assistant"} if prev == "user" else {"user"}
        if m["role"] not in want:
            raise UserError(
                f"{loc} turn {n + 1 - offset} is {m['role']} where {' or '.join(sorted(want))} was expected; a "
                "conversation is an optional system turn, then user and assistant turns in turn (an assistant "
                "turn with tool_calls followed by tool turns): merge or remove the turns that break it"
            )
        if m["role"] == "assistant" and not m["content"] and not m.get("tool_calls"):
            raise UserError(
                f"{loc} has an empty assistant turn (turn {n + 1 - offset}); fill it in or delete the turn "
                "and the user turn before it"
            )
        prev = m["role"]


def _tool_calls(t: dict, where: str) -> list[dict] | None:
    """An assistant turn's tool_calls in the form chat templates read ({"type": "function", "function": {"name",
    "arguments": an object}}), from OpenAI's (arguments as a JSON string) or a bare {"name", "arguments"}."""
    calls = t.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        raise UserError(f"{where} has tool_calls that are not a list of calls; write [{{name, arguments}}, ...]")
    out = []
    for c in calls:
        f = c.get("function", c) if isinstance(c, dict) else None
        args = f.get("arguments", {}) if isinstance(f, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(args, dict):
            raise UserError(
                f"{where} has a tool call {short(c)} without a name and JSON-object arguments; write "
                '{"function": {"name": "...", "arguments": {...}}}'
            )
        out.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def _turn_trained(t: dict, where: str) -> bool:
    """A turn's "train" flag (or Axolotl's "weight", which means the same): true/false, or 1/0 as exports of
    tables write them; absent or null trains the turn. Anything else ("false", "no", 2) is refused: a string is
    true to Python whatever it says, so it would train the turn the user meant to mask."""
    for key in ("train", "weight"):
        v = t.get(key)
        if v is None:
            continue
        if isinstance(v, (bool, int, float)) and v in (0, 1):
            if not v:
                return False
            continue
        raise UserError(
            f'{where} has "{key}": {json.dumps(v, default=str)[:40]}; write true or false (or 1 or 0) to '
            "train or mask the turn"
        )
    return True


def short(v) -> str:
    return repr(v)[:40]


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
    truncated_at_turn: int = 0  # conversations cut after their last whole assistant turn that fits
    untrainable: int = 0  # conversations without a trained assistant turn, dropped
    kept: list[dict] = field(default_factory=list)  # the source row of each encoded row


def row_start(r: dict) -> str:
    """A row's start, for errors about a row that passed the file checks (the file line is gone by then)."""
    text = r["instruction"] if "instruction" in r else next((m["content"] for m in r["messages"]), "")
    return f"(it starts {text[:40]!r})"


def encode_rows(rows: list[dict], template: PromptTemplate, tok, d: DataCfg, source: str) -> Encoded:
    enc = Encoded()
    if rows and ("messages" in rows[0] or template.kind == "chat"):
        # Under a chat template an Alpaca row is a single-turn conversation: all rows go through one batch.
        convs = [(r if "messages" in r else as_messages(r))["messages"] for r in rows]
        results = encode_conversations(template, tok, convs, d.max_length, [r.get("tools") for r in rows])
    else:
        results = (template.encode(tok, r["instruction"], r["input"] or None, r["output"], d.max_length) for r in rows)
    for r, (ids, labels, status) in zip(rows, results):
        if status == "untrainable":
            enc.untrainable += 1
            continue
        if status == "truncated_at_turn":
            # Whole turns kept, the later ones left out: nothing is learned from half an answer.
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a conversation is longer than data.max_length={d.max_length} tokens "
                    f"{row_start(r)}; raise data.max_length or set data.too_long=drop|truncate (both keep its "
                    "first turns that fit)"
                )
            enc.truncated_at_turn += 1
            enc.rows.append({"input_ids": ids, "labels": labels})
            enc.lengths.append(len(ids))
            enc.kept.append(r)
            continue
        if status == "fully_masked":
            # The prompt alone fills max_length: nothing would be learned from this row.
            enc.fully_masked += 1
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a row's prompt alone exceeds data.max_length={d.max_length} "
                    f"{row_start(r)}; raise data.max_length or "
                    "set data.too_long=drop"
                )
            continue
        if status == "truncated":
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a row is longer than data.max_length={d.max_length} tokens "
                    f"{row_start(r)}; raise data.max_length or "
                    "set data.too_long=drop|truncate"
                )
            if d.too_long == "drop":
                enc.dropped_too_long += 1
                continue
            enc.truncated += 1
        enc.rows.append({"input_ids": ids, "labels": labels})
        enc.lengths.append(len(ids))
        enc.kept.append(r)
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
    if isinstance(d.path, list):
        return _load_mix(d)
    records, digest = load_records(d)
    rows, st = clean_records(records, d, d.path)
    train_rows, eval_rows = split_records(rows, d.eval_size, d.seed, _dup_note(st))
    return train_rows, eval_rows, st, digest


def _dup_note(st: CleanStats) -> str:
    if not st.duplicates:
        return ""
    return f" ({st.duplicates} duplicate rows were dropped; data.drop_duplicates=false keeps them)"


def source_name(d: DataCfg) -> str:
    return d.path if isinstance(d.path, str) else " + ".join(e.path for e in d.path)


def as_messages(r: dict) -> dict:
    """An Alpaca row as the single-turn conversation a chat template renders it as (PromptTemplate._messages),
    for a run that mixes it with conversations."""
    user = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
    rest = {k: v for k, v in r.items() if k not in ("instruction", "input", "output")}
    return {**rest, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}


def _load_mix(d: DataCfg) -> tuple[list[dict], list[dict], CleanStats, str]:
    """Several sources (data.path entries): each read and checked with its own format and columns, capped at
    its max_rows, held out from together (data.eval_size of the whole), then the training rows of each
    weighted. Alpaca rows mixed with conversations become single-turn conversations."""
    total = CleanStats(format="")
    tagged, digests, mix = [], [], []
    for k, src in enumerate(d.path):
        sd = d.model_copy(
            update={
                "path": src.path,
                "format": src.format or d.format,
                "columns": d.columns if src.columns is None else src.columns,
                "split": src.split or d.split,
                "max_samples": src.max_rows,
            }
        )
        records, digest = load_records(sd)
        rows, st = clean_records(records, sd, src.path)
        digests.append(digest)
        total.rows_in += st.rows_in
        total.empty_output += st.empty_output
        total.duplicates += st.duplicates
        tagged += [(k, r) for r in rows]
        mix.append({"path": src.path, "format": st.format, "rows_in_file": st.rows_in, "kept": st.kept})
    formats = {m["format"] for m in mix}
    total.format = formats.pop() if len(formats) == 1 else "mixed"
    if total.format == "mixed":
        tagged = [(k, as_messages(r) if "instruction" in r else r) for k, r in tagged]
    if d.drop_duplicates:
        tagged = _drop_shared(tagged, mix, total)
    if d.max_samples:
        tagged = tagged[: d.max_samples]
    train, held = split_records(tagged, d.eval_size, d.seed, _dup_note(total))
    rng = random.Random(d.seed)
    train_rows = []
    for k, src in enumerate(d.path):
        mine = [r for j, r in train if j == k]
        whole, part = divmod(src.weight, 1)
        picked = mine * int(whole) + rng.sample(mine, round(part * len(mine)))
        train_rows += picked
        held_k = sum(1 for j, _ in held if j == k)
        mix[k].update(weight=src.weight, max_rows=src.max_rows, train_rows=len(picked), eval_rows=held_k)
    rng.shuffle(train_rows)  # sources interleaved, not one after the other
    if not train_rows:
        raise UserError("the data.path weights leave no training rows; raise a weight")
    for m in mix:
        m["share_of_train"] = round(m["train_rows"] / len(train_rows), 4)
    total.kept = len(tagged)
    total.mix = mix
    return train_rows, [r for _, r in held], total, combined_hash(digests)


def _drop_shared(tagged: list[tuple[int, dict]], mix: list[dict], total: CleanStats) -> list[tuple[int, dict]]:
    """A row that an earlier source already holds (the same file twice, a copy, a subset) is dropped from the
    later one: otherwise it may be held out from one source and trained from the other, and the evaluation
    would score rows the model trained on. Counted per source ("shared_rows") and in total.shared."""
    seen, out = set(), []
    for m in mix:
        m["shared_rows"] = 0
    for k, r in tagged:
        key = row_key(r)
        if key in seen:
            mix[k]["shared_rows"] += 1
            continue
        seen.add(key)
        out.append((k, r))
    for m in mix:
        m["kept"] -= m["shared_rows"]
        if m["shared_rows"]:
            log.warning(
                "data.path: %d row(s) of %s are also in an earlier source and were dropped from it, so that no "
                "row is both trained on and held out%s",
                m["shared_rows"],
                m["path"],
                "; it adds nothing" if not m["kept"] else "",
            )
    total.shared = sum(m["shared_rows"] for m in mix)
    total.duplicates += total.shared
    return out


def prepare(cfg: Config, tok, loaded: tuple | None = None) -> Prepared:
    """Everything finetune needs from the data, plus the report that dataset.py prints. `loaded`: what
    load_clean_split(cfg.data) returned, when the caller checked the data already."""
    d = cfg.data
    train_rows, eval_rows, st, digest = loaded or load_clean_split(d)
    template = PromptTemplate.from_config(d.prompt_template, tok, d.system_prompt, conversations=st.format != "alpaca")
    tr = encode_rows(train_rows, template, tok, d, source_name(d))
    ev = encode_rows(eval_rows, template, tok, d, source_name(d))
    if not tr.rows:
        raise UserError(_no_training_rows(d, tr))
    n_tokens = [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in tr.rows]
    report = {
        "source": source_name(d),
        "data_sha256": digest,
        "format": st.format,
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
        "truncated_at_turn": tr.truncated_at_turn + ev.truncated_at_turn,
        "untrainable_dropped": tr.untrainable + ev.untrainable,
        "policy": {"too_long": d.too_long, "empty_output": d.empty_output, "drop_duplicates": d.drop_duplicates},
        "train_tokens": sum(tr.lengths),
        "train_response_tokens": sum(n_tokens),
        "trained_share": round(sum(n_tokens) / max(1, sum(tr.lengths)), 4),
        "mean_length": round(sum(tr.lengths) / len(tr.lengths), 1),
        "max_length_seen": max(tr.lengths),
        "length_histogram": histogram(tr.lengths + ev.lengths),
        "examples": [show_example(tok, tr.rows[i]["input_ids"], tr.rows[i]["labels"]) for i in _example_rows(tr)],
    }
    if st.format != "alpaca":
        report["conversations"] = conversation_stats(tok, tr)
    if st.mix:
        report["mix"] = st.mix
        report["duplicates_across_sources"] = st.shared
    # The raw held-out rows, which evaluate.py answers and scores on their last assistant turn: a conversation
    # without one has no reference, and evaluate.py would refuse the run's own eval_rows.jsonl for it.
    eval_kept = [r for r in eval_rows if "messages" not in r or any(m["role"] == "assistant" for m in r["messages"])]
    return Prepared(tr, ev, eval_kept, template, report, digest)


def _no_training_rows(d: DataCfg, tr: Encoded) -> str:
    too_long = tr.dropped_too_long + tr.fully_masked
    if not too_long:
        # A longer max_length would change nothing for these.
        return (
            f"none of the {tr.untrainable} training conversations has an assistant turn to train (each is user-only, "
            'or marks every assistant turn "train": false); add the assistant\'s answers, or unmask them'
        )
    untrainable = f", and {tr.untrainable} conversations without a trained assistant turn" if tr.untrainable else ""
    return (
        f"no training rows left after applying data.too_long={d.too_long} at data.max_length={d.max_length} "
        f"({too_long} rows too long{untrainable}); raise data.max_length"
    )


def _example_rows(enc: Encoded) -> list[int]:
    """The two rows the report renders: the first two, or for conversations the two with the most assistant
    turns, so that the mask is seen across several turns."""
    if not enc.kept or "messages" not in enc.kept[0]:
        return list(range(min(2, len(enc.rows))))
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in enc.kept]
    return sorted(range(len(turns)), key=lambda i: (-turns[i], i))[:2]


def conversation_stats(tok, enc: Encoded) -> dict:
    """Turns per row and tokens per role over the training conversations. System, user and tool tokens are counted
    on their text alone; "markup" is what the template adds around the turns, plus assistant turns marked
    "train": false."""
    turns = [sum(m["role"] != "system" for m in r["messages"]) for r in enc.kept]
    by_role: dict[str, list[str]] = {"system": [], "user": []}
    if any(m["role"] == "tool" for r in enc.kept for m in r["messages"]):
        by_role["tool"] = []  # tools' outputs: masked text of their own, not markup
    for r in enc.kept:
        for m in r["messages"]:
            if m["role"] in by_role:
                by_role[m["role"]].append(m["content"])
    tokens = {
        role: sum(map(len, tok(texts, add_special_tokens=False)["input_ids"])) if texts else 0
        for role, texts in by_role.items()
    }
    tokens["assistant_trained"] = sum(1 for r in enc.rows for x in r["labels"] if x != IGNORE_INDEX)
    tokens["markup"] = max(0, sum(enc.lengths) - sum(tokens.values()))
    return {
        "turns_per_row": {
            "min": min(turns),
            "mean": round(sum(turns) / len(turns), 2),
            "max": max(turns),
        },
        "with_system_turn": sum(r["messages"][0]["role"] == "system" for r in enc.kept),
        "tokens_per_role": tokens,
    }


def print_report(rep: dict) -> None:
    print(
        f"dataset {rep['source']}  ({rep['format']} rows, {rep['prompt_template']} template, max_length "
        f"{rep['max_length']})"
    )
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
        f"{rep['mean_length']}, longest {rep['max_length_seen']}, trained share {rep['trained_share']:.1%}"
    )
    if "conversations" in rep:
        c = rep["conversations"]
        t = c["turns_per_row"]
        print(
            f"  turns a conversation {t['min']}-{t['max']} (mean {t['mean']}), with a system turn "
            f"{c['with_system_turn']}; cut after a whole turn {rep['truncated_at_turn']}, dropped without a "
            f"trained turn {rep['untrainable_dropped']}"
        )
        print("  tokens by role: " + ", ".join(f"{k} {v}" for k, v in c["tokens_per_role"].items()))
    for m in rep.get("mix") or []:
        print(
            f"  mix: {m['path']} ({m['format']}): {m['kept']} of {m['rows_in_file']} rows kept"
            + (f" ({m['shared_rows']} also in an earlier source)" if m.get("shared_rows") else "")
            + f", weight {m['weight']}"
            f" -> train {m['train_rows']} ({m['share_of_train']:.1%}), eval {m['eval_rows']}"
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
