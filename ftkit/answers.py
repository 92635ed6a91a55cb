"""Answering a JSON-lines file of prompts in resumable batches: the rows read with line-numbered errors, the
answers appended and flushed batch by batch, a restart skipping what is answered, the file rewritten in input
order at the end, and a user's own file never truncated or replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .cli import log
from .config import Config, DataCfg
from .data import clean_conversation
from .errors import UserError
from .generation import check_fits_context, generate, load_for_inference, prompt_ids
from .jsonl import fail_if_bad, loads, parse_jsonl, read_text
from .paths import RunDir, atomic_write_text, check_writable
from .runlock import clean_tmp_leftovers


def read_prompt_file(path: Path) -> list[dict]:
    """The rows of a JSONL prompt file, every line checked before any model is loaded.

    Each row: {"key": canonical id, "id": its id (given, else the 0-based row index), "instruction",
    "input", "prompt": what generate answers ((instruction, input), or for a `messages`/ShareGPT row the
    conversation up to its last user turn), "row": the object as read, "line": its line number}.
    """
    text = read_text(path, "input file", "pass JSON lines with an 'instruction' per line")
    parsed, bad = parse_jsonl(path, text)
    rows, seen = [], {}
    for index, (n, obj) in enumerate(parsed):
        rid = index
        if not isinstance(obj, dict):
            bad.append(f"line {n} is not a JSON object")
            continue
        conv_key = next((k for k in ("messages", "conversations") if isinstance(obj.get(k), list)), None)
        if conv_key:
            # A conversation (as dataset.py reads it): the answer is the next turn after its last user turn.
            try:
                conv = clean_conversation(
                    obj, DataCfg(), "messages" if conv_key == "messages" else "sharegpt", f"line {n}"
                )
            except UserError as e:
                bad.append(str(e))
                continue
            users = [i for i, m in enumerate(conv["messages"]) if m["role"] == "user"]
            if not users:
                bad.append(f"line {n} has no user turn to answer")
                continue
            prompt = conv["messages"][: users[-1] + 1]
            instruction, input_text = prompt[-1]["content"], None
        else:
            instruction = obj.get("instruction", obj.get("prompt"))
            if not isinstance(instruction, str) or not instruction.strip():
                bad.append(f"line {n} has an empty or missing 'instruction' (or 'prompt', or a 'messages' list)")
                continue
            input_text = obj.get("input")
            if input_text is not None and not isinstance(input_text, str):
                bad.append(f"line {n}: 'input' must be a string")
                continue
            prompt = (instruction, input_text or None)
        if "id" in obj:
            rid = obj["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                bad.append(f"line {n}: 'id' must be a string or an integer")
                continue
        key = json.dumps(rid)
        if key in seen:
            bad.append(f"line {n} repeats the id {key} of line {seen[key]}")
            continue
        seen[key] = n
        rows.append(
            {
                "key": key,
                "id": rid,
                "instruction": instruction,
                "input": input_text or None,
                "prompt": prompt,
                "row": obj,
                "line": n,
            }
        )
    bad.sort(key=lambda b: int(b.split()[1].rstrip(":")))  # malformed and invalid lines, in file order
    fail_if_bad(path, bad)
    if not rows:
        raise UserError(f"'{path}' holds no prompts; write one JSON object per line with an 'instruction'")
    return rows


def read_done(path: Path) -> dict[str, dict]:
    """Rows already answered in an output file, by canonical id. A last line cut short by a crash is
    dropped from the file (its row is answered again); any other unreadable line is an error."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise UserError(f"--output-file '{path}' is not a file")
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    not_ours = (
        f"--output-file '{path}' is not an answer file written by inference.py (JSON lines with 'id' and "
        "'response'); it is left untouched: move it away or pass another --output-file"
    )
    done: dict[str, dict] = {}
    # Every complete line is checked before anything is changed: the file may be the user's own data.
    for n, line in enumerate(data[:cut].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "id" not in row or "response" not in row:
            raise UserError(
                f"--output-file '{path}' is not an answer file written by inference.py: line {n} is not an "
                "answer row (JSON with 'id' and 'response'); it is left untouched: move it away or pass "
                "another --output-file"
            )
        done[json.dumps(row["id"])] = row
    if tail.strip():
        # answer_row puts "id" first, so a line of ours cut short starts like this. Anything else, or a file
        # with no complete answer before the cut, is not a crashed answer file.
        if not done or not tail.startswith(b'{"id": '):
            raise UserError(not_ours)
        log.warning(
            "'%s' ends in a line cut short by an interrupted write; dropping it (that row is answered again)", path
        )
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    return done


def answer_row(r: dict, answer: str) -> dict:
    return {"id": r["id"], **{k: v for k, v in r["row"].items() if k != "id"}, "response": answer}


def answer_file(
    cfg: Config,
    run: RunDir,
    input_file: Path,
    output_file: Path | None = None,
    use: str | None = None,
    adapter: Path | None = None,
) -> list[dict]:
    """Answer every row of `input_file` into `output_file` (JSONL), resumably; returns the rows in input order."""
    rows = read_prompt_file(input_file)
    output_file = output_file or input_file.with_name(input_file.stem + ".answers.jsonl")
    if output_file.resolve() == input_file.resolve():
        raise UserError(f"--output-file '{output_file}' is the input file; write the answers elsewhere")
    check_writable(output_file.parent, "--output-file")
    done = read_done(output_file)
    clean_tmp_leftovers(output_file.parent, names=(output_file.name,))  # a killed final rewrite's temporary file
    todo = [r for r in rows if r["key"] not in done]
    log.info(
        "%d prompts in %s: %d already answered in %s, %d to go",
        len(rows),
        input_file,
        len(rows) - len(todo),
        output_file,
        len(todo),
    )
    if todo:
        model, tok, template, _ = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
        for r in todo:  # name the line before any generation starts
            check_fits_context(
                model,
                len(prompt_ids(tok, template, r["prompt"])),
                cfg.inference.max_new_tokens,
                f"{input_file} line {r['line']}: the prompt",
            )
        output_file.parent.mkdir(parents=True, exist_ok=True)
        with open(output_file, "a", encoding="utf-8") as f:

            def write(indices: list[int], answers: list[str]) -> None:
                # One write per batch, then flush + fsync: a crash can only cut the batch in flight short.
                out = [answer_row(todo[i], a) for i, a in zip(indices, answers)]
                f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
                f.flush()
                os.fsync(f.fileno())
                done.update((json.dumps(o["id"]), o) for o in out)

            generate(
                model,
                tok,
                template,
                [r["prompt"] for r in todo],
                cfg.inference,
                progress=True,
                on_batch=write,
            )
    ordered = [done[r["key"]] for r in rows]
    keys = {r["key"] for r in rows}
    extra = [row for key, row in done.items() if key not in keys]
    if extra:
        log.warning("%d rows in %s have ids that are not in %s; kept at the end", len(extra), output_file, input_file)
    # All answered: rewrite in input order (atomically), so the file reads like the input.
    atomic_write_text(output_file, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in ordered + extra))
    log.info("wrote %d answers to %s", len(ordered), output_file)
    return ordered
