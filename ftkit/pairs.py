"""Preference data, and the door every method's data comes in by: rows with a chosen and a rejected answer to one
prompt (LLaMA-Factory's Alpaca preference rows, TRL's standard and conversational rows) or KTO's unpaired rows
(prompt, completion, label), detected (data.format), checked against train.method, cleaned (pairs whose sides are
equal counted and dropped), split, rendered through the run's chat template exactly as SFT renders a turn, and
reported. Rows of the SFT formats go on to ftkit/data.py unchanged.

What the TRL trainers get: conversational rows (prompt messages, then one assistant turn per side), with the
tokenizer's chat template set to the run's, so that the trainers render them as SFT and inference do."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import rl_rows
from .cli import log
from .config import PREFERENCE_METHODS, RL_METHODS, Config, DataCfg
from .data import (
    ROLES,
    CleanStats,
    Encoded,
    Prepared,
    _dup_note,
    histogram,
    load_records,
    show_example,
    source_name,
    split_records,
)
from .data import load_clean_split as load_sft_split
from .data import prepare as prepare_sft
from .data import print_report as print_sft_report
from .errors import UserError
from .prompts import IGNORE_INDEX, PromptTemplate, encode_conversations

PREFERENCE_FORMATS = ("alpaca_preference", "preference", "unpaired")
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # kto takes pairs too (TRL unpairs them) and unpaired rows


@dataclass
class PairStats(CleanStats):
    equal_pairs: int = 0  # chosen == rejected: nothing to prefer, dropped
    empty_sides: int = 0  # a side (or a KTO completion) with no text, dropped (or refused: data.empty_output)


# -- detection and the method ----------------------------------------------------------------------------------
def detect(records: list, d: DataCfg, source: str) -> str | None:
    """The preference format of the rows, None for the SFT formats: data.format, or for "auto" the first row's
    fields (logged)."""
    if d.format != "auto":
        return d.format if d.format in PREFERENCE_FORMATS else None
    first = next((r for r in records[:5] if isinstance(r, dict)), None)
    if first is None:
        return None
    if "chosen" in first or "rejected" in first:
        fmt = "alpaca_preference" if "instruction" in first else "preference"
    elif "completion" in first and "label" in first:
        fmt = "unpaired"
    else:
        return None
    log.info("data.format=auto: reading %s as %s rows (from its first rows' fields)", source, fmt)
    return fmt


def check_method(fmt: str | None, method: str, source: str, at: str, fields) -> None:
    """The data's kind against train.method: answers for SFT, pairs (or KTO's unpaired rows) for the others."""
    have = ", ".join(sorted(map(str, fields))) or "nothing"
    if fmt is None and method in PREFERENCE_METHODS:
        raise UserError(
            f"{source}: {at} has no chosen/rejected answers (it has: {have}), and train.method={method} trains on "
            "preference pairs; give rows with chosen and rejected (instruction/input/chosen/rejected or "
            "prompt/chosen/rejected), or set train.method=sft"
        )
    if fmt is not None and method == "sft":
        raise UserError(
            f"{source}: {at} is a preference row ({have}), and train.method=sft trains on one answer a prompt; set "
            f"train.method={'kto' if fmt == 'unpaired' else 'dpo'} (or another preference method), or give rows "
            "with an output"
        )
    if fmt is not None and method in RL_METHODS:
        raise UserError(
            f"{source}: {at} is a preference row ({have}), and train.method={method} samples its own answers to "
            "prompts and scores them with train.rewards; give Alpaca rows (instruction/input/output, the output as "
            "the reference answer) or conversations, or set train.method=dpo"
        )
    if fmt == "unpaired" and method in PAIRED_METHODS:
        raise UserError(
            f"{source}: {at} is an unpaired row (prompt/completion/label), and train.method={method} trains on pairs "
            "of a chosen and a rejected answer; set train.method=kto, or give chosen/rejected pairs"
        )


def load_clean_split(d: DataCfg, method: str = "sft") -> tuple[list[dict], list[dict], CleanStats, str]:
    """Every data error that needs no tokenizer, for any train.method: (train rows, held-out rows, stats, hash)."""
    if isinstance(d.path, list):
        if method in PREFERENCE_METHODS:
            raise UserError(
                f"train.method={method} reads one preference file; data.path is a list of sources (a mix), which "
                "is for SFT rows: point data.path at one file"
            )
        return load_sft_split(d)
    records, digest = load_records(d)
    if not records:
        raise UserError(f"dataset '{d.path}' has no rows; point data.path at a non-empty file")
    fmt = detect(records, d, d.path)
    lines = getattr(records, "lines", None)
    first = next((i for i, r in enumerate(records) if isinstance(r, dict)), 0)
    at = f"line {lines[first]}" if lines else f"row {first + 1}"
    check_method(fmt, method, d.path, at, records[first] if isinstance(records[first], dict) else ())
    if fmt is None:
        return load_sft_split(d)
    if d.columns:
        raise UserError(
            f"data.columns renames the SFT fields ({', '.join(d.columns)}); {d.path} holds {fmt} rows, whose fields "
            "(prompt/instruction, chosen, rejected, completion, label) are read by these names: remove data.columns"
        )
    rows, st = clean_rows(records, d, fmt)
    train_rows, eval_rows = split_records(rows, d.eval_size, d.seed, _dup_note(st))
    return train_rows, eval_rows, st, digest


# -- cleaning -------------------------------------------------------------------------------------------------
def clean_rows(records: list, d: DataCfg, fmt: str) -> tuple[list[dict], PairStats]:
    """Each row as {prompt: messages, chosen, rejected} (or {prompt, completion, label}), plus its other fields."""
    st = PairStats(rows_in=len(records), format=fmt)
    out, seen, lines = [], set(), getattr(records, "lines", None)
    for i, r in enumerate(records, 1):
        where = f"{d.path}: {f'line {lines[i - 1]}' if lines else f'row {i}'}"
        row = clean_row(r, fmt, where)
        sides = [row["completion"]] if fmt == "unpaired" else [row["chosen"], row["rejected"]]
        if not all(sides):
            st.empty_sides += 1
            if d.empty_output == "fail":
                raise UserError(
                    f"{where} has an empty answer; fill it in, delete the row, or set data.empty_output=drop"
                )
            continue
        if fmt != "unpaired" and row["chosen"] == row["rejected"]:
            st.equal_pairs += 1
            continue
        key = repr({k: row[k] for k in ("prompt", "chosen", "rejected", "completion", "label") if k in row})
        if key in seen and d.drop_duplicates:
            st.duplicates += 1
            continue
        seen.add(key)
        out.append(row)
    if d.max_samples:
        out = out[: d.max_samples]
    st.kept, st.empty_output = len(out), st.empty_sides
    if st.equal_pairs:
        log.warning("%s: %d pair(s) whose chosen and rejected answers are equal were dropped", d.path, st.equal_pairs)
    if not out:
        why = "chosen == rejected in every pair" if st.equal_pairs == st.rows_in else "all were empty or duplicates"
        raise UserError(
            f"{d.path}: no usable preference rows left ({why}: {st.equal_pairs} equal, {st.empty_sides} empty, "
            f"{st.duplicates} duplicates); a pair needs a rejected answer that differs from the chosen one"
        )
    return out, st


def clean_row(r, fmt: str, where: str) -> dict:
    if not isinstance(r, dict):
        raise UserError(f"{where} is a {type(r).__name__}, not an object; each line holds one preference row")
    extra = {k: v for k, v in r.items() if k not in ("instruction", "input", "prompt", "chosen", "rejected")}
    extra = {k: v for k, v in extra.items() if k not in ("completion", "label")}
    if fmt == "alpaca_preference":
        inst, inp = _text(r, "instruction", where), r.get("input") or ""
        if not isinstance(inp, str):
            raise UserError(f"{where} field 'input' is {type(inp).__name__}, not text; store it as a string")
        user = inst if not inp.strip() else f"{inst}\n\n{inp.strip()}"
        prompt = [{"role": "user", "content": user}]
        return {**extra, "prompt": prompt, "chosen": _side(r, "chosen", where), "rejected": _side(r, "rejected", where)}
    if fmt == "unpaired":
        label = r.get("label")
        if not isinstance(label, bool):
            raise UserError(
                f"{where} has label {str(label)[:40]!r}; KTO's label says whether the completion is desirable: write "
                "true or false (JSON booleans, not text or numbers)"
            )
        prompt = _prompt(r, where)
        return {**extra, "prompt": prompt, "completion": _side(r, "completion", where), "label": label}
    if "prompt" not in r and isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list):
        return {**extra, **_split_conversations(r, where)}
    return {
        **extra,
        "prompt": _prompt(r, where),
        "chosen": _side(r, "chosen", where),
        "rejected": _side(r, "rejected", where),
    }


def _text(r: dict, key: str, where: str) -> str:
    v = r.get(key)
    if not isinstance(v, str) or not v.strip():
        got = "is missing" if key not in r else f"is {type(v).__name__ if not isinstance(v, str) else 'empty'}"
        raise UserError(f"{where}: '{key}' {got}; give it text, or delete the row")
    return v.strip()


def _side(r: dict, key: str, where: str) -> str:
    """One answer as text: a string, or an assistant-only message list ([{role: assistant, content}])."""
    if key not in r or r[key] is None:
        what = "a pair needs both sides" if key in ("chosen", "rejected") else "an unpaired row needs one"
        raise UserError(f"{where} has no '{key}' answer ({what}); add it or delete the row")
    v = r[key]
    if isinstance(v, list):
        msgs = _messages(v, where, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise UserError(
                f"{where}: '{key}' beside a prompt must be one assistant turn; put the earlier turns in 'prompt'"
            )
        return msgs[0]["content"]
    if not isinstance(v, str):
        raise UserError(f"{where} field '{key}' is {type(v).__name__}, not text; store it as a string")
    return v.strip()


def _prompt(r: dict, where: str) -> list[dict]:
    v = r.get("prompt")
    if isinstance(v, list):
        msgs = _messages(v, where, "prompt")
    elif isinstance(v, str) and v.strip():
        msgs = [{"role": "user", "content": v.strip()}]
    else:
        raise UserError(f"{where} has no prompt text ('prompt' {'is missing' if v is None else 'is empty'}); add it")
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn, which the answers reply to")
    return msgs


def _messages(v: list, where: str, key: str) -> list[dict]:
    out = []
    for n, t in enumerate(v, 1):
        role = ROLES.get(t.get("role", t.get("from"))) if isinstance(t, dict) else None
        text = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role is None or not isinstance(text, str):
            raise UserError(f"{where}: '{key}' turn {n} is not a {{role, content}} message with a known role and text")
        out.append({"role": role, "content": text.strip()})
    return out


def _split_conversations(r: dict, where: str) -> dict:
    """TRL's implicit prompt: two whole conversations that share every turn but the last assistant one."""
    c, rj = _messages(r["chosen"], where, "chosen"), _messages(r["rejected"], where, "rejected")
    if not c or not rj or c[-1]["role"] != "assistant" or rj[-1]["role"] != "assistant":
        raise UserError(f"{where}: chosen and rejected must each end with an assistant turn, the answers compared")
    if c[:-1] != rj[:-1] or not c[:-1]:
        raise UserError(
            f"{where}: chosen and rejected do not share the turns before their last (the implicit prompt); give the "
            "shared turns as 'prompt' and one assistant turn as each side"
        )
    return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": rj[-1]["content"]}


# -- rendering, the report -----------------------------------------------------------------------------------------
def pair_template(cfg: Config, tok) -> PromptTemplate:
    """The run's template as a chat template (Alpaca's as its conversation layout), set on the tokenizer too so the
    TRL trainers, which render conversational rows with the tokenizer's template, render what SFT would."""
    d = cfg.data
    template = PromptTemplate.from_config(d.prompt_template, tok, d.system_prompt, conversations=True)
    tok.chat_template = template.chat_template
    return template


def trl_row(row: dict, template: PromptTemplate) -> dict:
    """A cleaned row as TRL's conversational preference (or unpaired) row."""
    out = {"prompt": template.with_system(row["prompt"])}
    for key in ("chosen", "rejected", "completion"):
        if key in row:
            out[key] = [{"role": "assistant", "content": row[key]}]
    if "label" in row:
        out["label"] = row["label"]
    return out


def encode_pairs(rows: list[dict], template: PromptTemplate, tok, d: DataCfg, source: str) -> tuple[Encoded, dict]:
    """TRL rows of the pairs that fit data.max_length (by data.too_long), their lengths (both sides' tokens), and
    counts. Each side is encoded as SFT encodes the turn, so the lengths and masks are the ones trained."""
    sides = ("completion",) if rows and "completion" in rows[0] else ("chosen", "rejected")
    convs = [r["prompt"] + [{"role": "assistant", "content": r[s]}] for r in rows for s in sides]
    enc_all = encode_conversations(template, tok, convs, d.max_length)
    enc, counts, k = Encoded(), Counter(), len(sides)
    for i, r in enumerate(rows):
        parts = enc_all[i * k : (i + 1) * k]
        status = {s for _, _, s in parts}
        if "fully_masked" in status:  # the prompt alone fills max_length: TRL drops such rows too
            counts["prompt_too_long"] += 1
            continue
        if status & {"truncated", "truncated_at_turn"}:
            if d.too_long == "fail":
                raise UserError(
                    f"{source}: a pair is longer than data.max_length={d.max_length} tokens (its prompt starts "
                    f"{r['prompt'][-1]['content'][:40]!r}); raise data.max_length or set data.too_long=drop|truncate"
                )
            counts["cut_at_max_length"] += 1
            if d.too_long == "drop":
                continue
        for s, (_ids, labels, _) in zip(sides, parts):
            counts[f"{s}_tokens"] += sum(x != IGNORE_INDEX for x in labels)
            counts["prompt_tokens"] += sum(x == IGNORE_INDEX for x in labels) / k
        enc.rows.append(trl_row(r, template))
        enc.lengths.append(sum(len(ids) for ids, _, _ in parts))
        enc.kept.append((r, parts))
    return enc, counts


def prepare(cfg: Config, tok, loaded: tuple | None = None) -> Prepared:
    """What finetune needs from the data for any method, and the report dataset.py prints."""
    d = cfg.data
    loaded = loaded or load_clean_split(d, cfg.train.method)
    train_rows, eval_rows, st, digest = loaded
    if cfg.train.method in RL_METHODS:
        return rl_rows.prepare(cfg, tok, loaded)
    if st.format not in PREFERENCE_FORMATS:
        return prepare_sft(cfg, tok, loaded)
    template = pair_template(cfg, tok)
    tr, tr_counts = encode_pairs(train_rows, template, tok, d, source_name(d))
    ev, ev_counts = encode_pairs(eval_rows, template, tok, d, source_name(d))
    if not tr.rows:
        raise UserError(
            f"no training pairs left at data.max_length={d.max_length} (data.too_long={d.too_long}: "
            f"{tr_counts['cut_at_max_length']} too long, {tr_counts['prompt_too_long']} prompts alone too long); "
            "raise data.max_length"
        )
    report = pair_report(cfg, tok, st, digest, tr, ev, tr_counts + ev_counts, tr_counts)
    return Prepared(tr, ev, [r for r, _ in ev.kept], template, report, digest)


def pair_report(cfg: Config, tok, st: PairStats, digest: str, tr: Encoded, ev: Encoded, counts, tr_counts) -> dict:
    d, n = cfg.data, len(tr.rows)
    sides = ("completion",) if st.format == "unpaired" else ("chosen", "rejected")
    row, parts = tr.kept[0]
    example = {}
    for s, (ids, labels, _) in zip(sides, parts):
        example[s] = show_example(tok, ids, labels)
    rep = {
        "source": source_name(d),
        "data_sha256": digest,
        "format": st.format,
        "method": cfg.train.method,
        "prompt_template": d.prompt_template,
        "max_length": d.max_length,
        "rows_in_file": st.rows_in,
        "rows_kept": st.kept,
        "train_rows": n,
        "eval_rows": len(ev.rows),
        "equal_pairs_dropped": st.equal_pairs,
        "empty_sides": st.empty_sides,
        "duplicates": st.duplicates,
        "cut_at_max_length": counts["cut_at_max_length"],
        "dropped_too_long": counts["cut_at_max_length"] if d.too_long == "drop" else 0,
        "prompt_too_long_dropped": counts["prompt_too_long"],
        "policy": {"too_long": d.too_long, "empty_output": d.empty_output, "drop_duplicates": d.drop_duplicates},
        "mean_tokens": {k: round(tr_counts[f"{k}_tokens"] / n, 1) for k in ("prompt", *sides)},
        "train_tokens": sum(tr.lengths),
        "mean_length": round(sum(tr.lengths) / n, 1),
        "max_length_seen": max(tr.lengths),
        "length_histogram": histogram(tr.lengths + ev.lengths),
        "examples": [example],
    }
    if st.format == "unpaired":
        rep["desirable"] = sum(r["label"] for r, _ in tr.kept)
        rep["undesirable"] = n - rep["desirable"]
    return rep


def print_report(rep: dict) -> None:
    if rep.get("method") in RL_METHODS:
        return rl_rows.print_report(rep)
    if rep["format"] not in PREFERENCE_FORMATS:
        return print_sft_report(rep)
    unit = "rows" if rep["format"] == "unpaired" else "pairs"
    print(
        f"dataset {rep['source']}  ({rep['format']} {unit} for train.method={rep['method']}, {rep['prompt_template']} "
        f"template, max_length {rep['max_length']})"
    )
    print(
        f"  rows in file {rep['rows_in_file']}, kept {rep['rows_kept']} -> train {rep['train_rows']}, eval "
        f"{rep['eval_rows']}; equal sides dropped {rep['equal_pairs_dropped']}, empty sides {rep['empty_sides']}, "
        f"duplicates {rep['duplicates']}, cut at max_length {rep['cut_at_max_length']} "
        f"(data.too_long={rep['policy']['too_long']}), prompt alone too long {rep['prompt_too_long_dropped']}"
    )
    means = ", ".join(f"{k} {v}" for k, v in rep["mean_tokens"].items())
    print(f"  mean tokens: {means}; longest {unit[:-1]} {rep['max_length_seen']} tokens (both sides)")
    if "desirable" in rep:
        print(f"  desirable {rep['desirable']}, undesirable {rep['undesirable']}")
    for side, ex in rep["examples"][0].items():
        print(
            f"\n  example, {side} side, as rendered:\n{ex['text']}\n  trained-on tokens ('·' = masked):\n"
            f"{ex['trained_on']}"
        )
