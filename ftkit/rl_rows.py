"""GRPO's rows (train.method=grpo): each training row's prompt, as text rendered by the run's prompt template, with
its reference answer beside it for the rewards. The rows are the SFT formats (Alpaca rows, conversations, a mix):
the answer is an Alpaca row's `output` or a conversation's last assistant turn, and the prompt is everything
before it (a conversation that ends with a user turn is a prompt without an answer).

TRL's GRPOTrainer tokenizes a text prompt itself (`tokenizer(text)`), so the text handed over is checked to give
the very tokens the template gives: where a chat template writes its own BOS and the tokenizer adds one too, the
written one is left out of the text, and the tokenizer's takes its place.
"""

from __future__ import annotations

from .cli import log
from .config import Config
from .data import Encoded, Prepared, histogram, load_clean_split, row_start, source_name
from .errors import UserError
from .prompts import PromptTemplate


def split_row(r: dict) -> tuple[list[dict] | tuple[str, str | None], str | None]:
    """(the prompt, the reference answer or None) of a cleaned SFT row; an assistant turn that only calls a tool
    is no text answer."""
    if "messages" not in r:
        return (r["instruction"], r.get("input") or None), r.get("output") or None
    msgs = r["messages"]
    if msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1].get("content") or None
    return msgs, None


def prompt_text(template: PromptTemplate, tok, prompt) -> str:
    """The text the model sees before its answer, as the template renders it for generation."""
    if isinstance(prompt, tuple):
        return template.render_prompt(tok, *prompt)
    return template.messages_prompt_text(tok, prompt)


def as_trl_text(template: PromptTemplate, tok, text: str) -> tuple[str, list[int]]:
    """The prompt text for TRL, whose `tokenizer(text)` must give the template's ids; and those ids."""
    ids = template.text_ids(tok, text)
    bos = tok.bos_token
    if not template.tokenizer_bos() and bos and text.startswith(bos) and tok("")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos) :]
    if tok(text)["input_ids"] != ids:
        raise UserError(
            f"train.method=grpo: TRL tokenizes each prompt's text itself, and data.prompt_template="
            f"{template.name} gives other tokens that way than the template does ({text[:60]!r}...); use another "
            "data.prompt_template (chat, or a shipped name)"
        )
    return text, ids


def shared_fields(rows: list[dict]) -> list[str]:
    """The rows' own fields the rewards get as columns (family, id, ...): those every row has, with one JSON type
    of text, number or boolean (a table column has one type). Others are left out, with a note in the log."""
    # the row's own text, and the names TRL passes a reward itself
    own = {"instruction", "input", "output", "messages", "tools", "prompt", "answer", "completion", "completion_ids"}
    own |= {"prompts", "completions", "trainer_state", "log_extra", "log_metric", "environments"}
    keys: dict[str, set] = {}
    for r in rows:
        for k, v in r.items():
            if k not in own:
                keys.setdefault(k, set()).add(type(v).__name__ if isinstance(v, (str, int, float, bool)) else "other")
    kept = [k for k, kinds in keys.items() if len(kinds) == 1 and "other" not in kinds and all(k in r for r in rows)]
    if len(kept) < len(keys):
        log.info(
            "train.method=grpo: the rewards get the rows' fields %s; left out (missing in some rows, or of mixed or "
            "nested types): %s",
            ", ".join(kept) or "none",
            ", ".join(k for k in keys if k not in kept),
        )
    return kept


def encode_prompts(rows: list[dict], template: PromptTemplate, tok, cfg: Config) -> tuple[Encoded, int]:
    """TRL's rows {prompt, answer, and the row's own fields} and each prompt's length plus the completion budget
    (what memory is planned for); prompts that leave no room for train.max_completion_length in data.max_length
    are dropped and counted."""
    budget, room = cfg.train.max_completion_length, cfg.data.max_length - cfg.train.max_completion_length
    enc, too_long = Encoded(), 0
    extra_keys = shared_fields(rows)
    for r in rows:
        if r.get("tools"):
            raise UserError(
                f"train.method=grpo: a conversation offers tools {row_start(r)}; GRPO here samples text answers and "
                "does not run tool calls: drop the tools field, or train it with train.method=sft"
            )
        prompt, answer = split_row(r)
        text, ids = as_trl_text(template, tok, prompt_text(template, tok, prompt))
        if len(ids) > room:
            too_long += 1
            continue
        enc.rows.append({**{k: r[k] for k in extra_keys}, "prompt": text, "answer": answer})
        enc.lengths.append(len(ids) + budget)
        enc.kept.append(r)
    return enc, too_long


def prepare(cfg: Config, tok, loaded: tuple | None = None) -> Prepared:
    """What finetune and dataset.py need for GRPO: the prompts (train), the held-out rows evaluate.py scores, the
    template, the report."""
    d, t = cfg.data, cfg.train
    train_rows, eval_rows, st, digest = loaded or load_clean_split(d)
    template = PromptTemplate.from_config(d.prompt_template, tok, d.system_prompt, conversations=st.format != "alpaca")
    tr, too_long = encode_prompts(train_rows, template, tok, cfg)
    ev, ev_too_long = encode_prompts(eval_rows, template, tok, cfg)
    if not tr.rows:
        raise UserError(
            f"no training prompts left: all {too_long} are longer than data.max_length={d.max_length} minus "
            f"train.max_completion_length={t.max_completion_length} tokens; raise data.max_length or lower "
            "train.max_completion_length"
        )
    prompt_tokens = [n - t.max_completion_length for n in tr.lengths]
    report = {
        "source": source_name(d),
        "data_sha256": digest,
        "format": st.format,
        "method": t.method,
        "prompt_template": d.prompt_template,
        "max_length": d.max_length,
        "max_completion_length": t.max_completion_length,
        "rows_in_file": st.rows_in,
        "rows_kept": st.kept,
        "duplicates": st.duplicates,
        "train_rows": len(tr.rows),
        "eval_rows": len(ev.rows),
        "prompt_too_long_dropped": too_long + ev_too_long,
        "without_answer": sum(r["answer"] is None for r in tr.rows),
        "rewards": list(t.rewards),
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "max_prompt_tokens": max(prompt_tokens),
        "length_histogram": histogram(prompt_tokens),
        "examples": [{"prompt": r["prompt"], "answer": r["answer"]} for r in tr.rows[:2]],
    }
    eval_kept = [r for r in ev.kept if split_row(r)[1] is not None]
    return Prepared(tr, ev, eval_kept, template, report, digest)


def print_report(rep: dict) -> None:
    print(
        f"dataset {rep['source']}  ({rep['format']} rows as prompts for train.method={rep['method']}, "
        f"{rep['prompt_template']} template, max_length {rep['max_length']} = prompt + completion of up to "
        f"{rep['max_completion_length']})"
    )
    print(
        f"  rows in file {rep['rows_in_file']}, kept {rep['rows_kept']} -> train {rep['train_rows']}, eval "
        f"{rep['eval_rows']}; duplicates {rep['duplicates']}, prompts too long {rep['prompt_too_long_dropped']}, "
        f"without a reference answer {rep['without_answer']}; rewards: {', '.join(rep['rewards'])}"
    )
    print(f"  prompt tokens: mean {rep['mean_prompt_tokens']}, longest {rep['max_prompt_tokens']}")
    for i, ex in enumerate(rep["examples"], 1):
        print(f"\n  example {i}, the prompt as the model sees it:\n{ex['prompt']}\n  reference answer: {ex['answer']}")
