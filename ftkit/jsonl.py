"""The one JSON-lines reader: every stage that reads a .jsonl file (training data, held-out rows, prompt
files) gets the same errors, each naming the file and its line numbers (not row numbers: blank lines are
allowed, so the two differ, and an editor jumps to a line)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def read_text(path: Path, what: str, fix: str) -> str:
    """The file as UTF-8 text; a folder, a missing file or another encoding is a one-line error. `what`
    names the file's role ("data.path", "--rows"), `fix` what to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder, not a file; {fix}")
    if not path.is_file():
        # A FIFO or a device (/dev/zero) exists but would block or never end when read.
        found = "is not a regular file (a pipe, a device or a socket)" if path.exists() else "not found"
        raise UserError(f"{what} '{path}' {found}; {fix}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror}); fix its permissions") from None


def loads(text):
    """json.loads, with a document nested too deeply for Python's recursion (a hostile file: 200,000 brackets)
    raised as the decode error it is, so that every caller's handling of a corrupt file covers it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def not_text(value) -> str | None:
    """Where `value` (a string, or the strings in a parsed JSON or YAML value) holds a lone surrogate, which no
    file or tokenizer can encode: valid JSON ("\\ud800", half of an emoji cut in two) and what Python makes of
    bytes that are not UTF-8 on a command line. None when all of it is text. Each container is read once: a YAML
    alias bomb is a few shared lists that would expand to billions of strings if walked as a tree."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (
                    f"{e.object[e.start]!r} (a lone surrogate: invalid UTF-8, or half of a character such as an emoji)"
                )
        elif isinstance(v, (list, tuple, dict)) and id(v) not in seen:
            seen.add(id(v))
            todo.extend([*v.keys(), *v.values()] if isinstance(v, dict) else v)
    return None


def check_text(value, where: str, fix: str) -> None:
    """Refuse text no tokenizer can encode (see not_text) with one line naming `where` and `fix`."""
    bad = not_text(value)
    if bad:
        raise UserError(f"{where} holds {bad}, which is not text; {fix}")


def parse_jsonl(path: Path, text: str) -> tuple[list[tuple[int, object]], list[str]]:
    """(line number, value) for each non-blank line, and one problem per malformed line. Callers add their
    own per-row problems to the same list and end with `fail_if_bad`, so every reader reports every bad line
    of a file the same way in one run of the command."""
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"line {n} is not valid JSON ({e.msg})")
            continue
        if "\\u" in line and (why := not_text(rows[-1][1])):  # only an escape can make a surrogate here
            rows.pop()
            bad.append(f"line {n} holds {why}")
    return rows, bad


def fail_if_bad(path: Path, bad: list[str]) -> None:
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UserError(f"{path}: {'; '.join(bad[:3])}{more}; fix or remove the line(s) and run again")


def read_jsonl(path: Path, what: str, fix: str) -> list[tuple[int, object]]:
    """Every line parsed, or one error naming the bad lines."""
    rows, bad = parse_jsonl(Path(path), read_text(path, what, fix))
    fail_if_bad(path, bad)
    return rows


def read_log_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file this project wrote (train_log.jsonl): a missing file is empty, and a line
    cut off by a kill is skipped rather than an error, since the file is ours and the rest of it is sound."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out
