"""The preference demo's pairs (configs/demo_dpo.yaml): each verifiable demo task (ftkit/demo_data.py) with its
correct answer as `chosen` and a plausible wrong one as `rejected`, seeded. The wrong answer is the base model's
own when one is given (answers that missed the task, as evaluate.py's base run gives them), else a corruption of
the right answer a model plausibly makes: a number off by a little, two list items swapped, a word repeated once
too often or too few times, a date a day off, another name or number from the same text.
data/generate_demo_data.py --pairs is its command line."""

from __future__ import annotations

import random
import re

from .demo_data import DATA_DIR, EMAIL_DOMAINS, MONTHS, WEEKDAYS, normalize_answer

DEFAULT_PAIRS_PER_FAMILY = 100
DEFAULT_PAIRS_OUT = DATA_DIR / "demo_pairs.jsonl"


def _off_by(n: str, rng: random.Random) -> str:
    """A number a little wrong: off by one to three, or by a factor of ten (a slipped unit conversion)."""
    v = int(n)
    if v >= 100 and rng.random() < 0.3:
        return str(v // 10 if rng.random() < 0.5 else v * 10)
    return str(max(0, v + rng.choice([-3, -2, -1, 1, 2, 3])))


def _swap(items: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(items) - 1)
    return [*items[:i], items[i + 1], items[i], *items[i + 2 :]]


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong answer to a verifiable demo task; never the right one (after normalization)."""
    out = row["output"]
    for _ in range(20):
        wrong = _corrupt(row["family"], out, row.get("input") or "", rng)
        if normalize_answer(wrong) != normalize_answer(out) and wrong.strip():
            return wrong
    return f"{out} {out}"  # every corruption tried came out right (a one-token answer): repeat it


def _corrupt(family: str, out: str, text: str, rng: random.Random) -> str:
    if family == "sort_numbers" and ", " in out:
        items = out.split(", ")
        return ", ".join(_swap(items, rng) if rng.random() < 0.7 else items[::-1])
    for names in (MONTHS, WEEKDAYS):  # the month or weekday before or after
        if out in names:
            return names[(names.index(out) + rng.choice([-1, 1])) % len(names)]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", out):  # a date a day or two off
        y, m, d = out.split("-")
        return f"{y}-{m}-{max(1, min(28, int(d) + rng.choice([-2, -1, 1, 2]))):02d}"
    if "-" in out and not any(c.isdigit() for c in out):  # joined words, two of them swapped
        return "-".join(_swap(out.split("-"), rng))
    if "@" in out:  # the address with another domain
        user, domain = out.split("@", 1)
        return f"{user}@{rng.choice([d for d in EMAIL_DOMAINS if d != domain])}"
    if family == "extraction":
        # Another token of the same kind from the text (a name, a number, an address) is the likely mistake.
        pool = [w.strip(".,;") for w in text.split() if w.strip(".,;") != out]
        kind = [w for w in pool if (w[:1].isupper() == out[:1].isupper()) and (w.isdigit() == out.isdigit())]
        if kind:
            return rng.choice(kind)
    words = out.split()
    if family == "word_ops" and len(words) > 1 and len(set(words)) == 1:
        return " ".join(words[:-1] if rng.random() < 0.5 else [*words, words[0]])
    numbers = re.findall(r"\d+", out)
    if numbers:
        k = rng.randrange(len(numbers))
        parts = re.split(r"(\d+)", out)
        idx = [i for i, p in enumerate(parts) if p.isdigit()][k]
        parts[idx] = _off_by(parts[idx], rng)
        return "".join(parts)
    if len(words) > 1:
        return " ".join(_swap(words, rng))
    if len(out) == 1:  # another letter
        return rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != out.lower()])
    return out[::-1] if out[::-1] != out else out + out[-1:]


def generate_pairs(
    rows: list[dict], seed: int = 0, per_family: int = DEFAULT_PAIRS_PER_FAMILY, base_answers: dict | None = None
) -> list[dict]:
    """Alpaca preference rows (instruction, input, chosen, rejected, family, verifiable) from the verifiable demo
    rows, at most `per_family` a family, in the rows' order. `base_answers`: {(instruction, input): the base
    model's answer}; a wrong one is taken as `rejected` (field `rejected_from`: "base"), a right one is replaced by
    a corruption ("corrupted"), as is a missing one."""
    counts: dict[str, int] = {}
    out = []
    for r in rows:
        fam = r.get("family")
        if not r.get("verifiable") or counts.get(fam, 0) >= per_family:
            continue
        counts[fam] = counts.get(fam, 0) + 1
        rng = random.Random(f"{seed}:{r['instruction']}:{r['input']}")
        base = (base_answers or {}).get((r["instruction"], r["input"]))
        from_base = base is not None and base.strip() and normalize_answer(base) != normalize_answer(r["output"])
        out.append(
            {
                "instruction": r["instruction"],
                "input": r["input"],
                "chosen": r["output"],
                "rejected": base.strip() if from_base else wrong_answer(r, rng),
                "family": fam,
                "verifiable": True,
                "rejected_from": "base" if from_base else "corrupted",
            }
        )
    return out


def base_answers(cfg, rows: list[dict], max_new_tokens: int = 32) -> dict:
    """The base model's own greedy answers to the rows' prompts, rendered as the run will render them (cfg's
    template as a chat template, ftkit/pairs.py), for generate_pairs(base_answers=...)."""
    from .generation import generate
    from .models import load_causal_lm, load_tokenizer, pick_device, resolve_model, torch_dtype
    from .prompts import PromptTemplate

    source, offline = resolve_model(cfg.model)
    tok = load_tokenizer(cfg, source, offline)
    device = pick_device(cfg.inference.device)
    model = load_causal_lm(cfg, source, offline, dtype=torch_dtype(cfg.model.dtype), device_map={"": device}).eval()
    d = cfg.data
    template = PromptTemplate.from_config(d.prompt_template, tok, d.system_prompt, conversations=True)
    greedy = cfg.inference.model_copy(update={"do_sample": False, "max_new_tokens": max_new_tokens})
    prompts = [(r["instruction"], r["input"] or None) for r in rows]
    answers = generate(model, tok, template, prompts, greedy, progress=True)
    return {(r["instruction"], r["input"]): a for r, a in zip(rows, answers)}
