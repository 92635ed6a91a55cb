"""Scoring a model on held-out rows: response-token loss with the prompt masked as in training, greedy answers,
exact match (normalized) for verifiable rows and ROUGE-L F1 for the rest, per task family, base vs fine-tuned.
A held-out conversation is scored on its last assistant turn, answered from the turns before it; its loss is
over all its assistant turns, masked as in training."""

from __future__ import annotations

import math
import time
from collections import defaultdict

from .cli import log
from .config import Config, DataCfg
from .data import clean_conversation
from .demo_data import normalize_answer
from .errors import UserError
from .generation import Prompt, generate, load_for_inference
from .paths import RunDir
from .prompts import IGNORE_INDEX, PromptTemplate, encode_conversations

# Verifiable answers are short; an answer this many tokens longer than the longest reference cannot match.
VERIFIABLE_MARGIN_TOKENS = 8


N_EXAMPLES = 5


NO_FAMILY = "all"


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answers agree after normalization (whitespace, case, a final period), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of stemmed words), 0..1; 0 for an empty answer."""
    global _scorer
    if not prediction.strip() or not reference.strip():
        return 0.0
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)


def held_out_row(r, at: str) -> dict:
    """A held-out row checked and ready to score. An Alpaca row needs an instruction and a reference answer
    (`output`). A `messages` row is cut after its last assistant turn, which becomes the reference, with its
    last user turn as the `instruction` shown in reports. Errors start with `at` ("FILE: line N")."""
    if isinstance(r, dict) and ("chosen" in r or "completion" in r):
        r = pair_as_conversation(r, at)
    if isinstance(r, dict) and isinstance(r.get("messages"), list):
        conv = clean_conversation(r, DataCfg(), "messages", at)["messages"]
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError(f"{at} has no assistant turn to score; each conversation needs a reference answer")
        return {
            **r,
            "messages": conv[: last + 1],
            "instruction": conv[last - 1]["content"],
            "input": "",
            "output": conv[last]["content"],
        }
    if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
        raise UserError(f"{at} has no instruction; each row needs instruction, input, output (or a messages list)")
    if not isinstance(r.get("output"), str) or not r["output"].strip():
        raise UserError(f"{at} has no reference answer ('output'); evaluation needs one per row")
    return r


def pair_as_conversation(r: dict, at: str) -> dict:
    """A held-out preference pair (a preference run's eval_rows.jsonl) as the conversation that ends with its chosen
    answer, the reference, with the rejected answer kept beside it for the preference accuracy."""
    if "completion" in r:
        raise UserError(
            f"{at} is an unpaired row (prompt/completion/label): the preference accuracy compares a chosen with a "
            "rejected answer; pass --rows FILE of held-out pairs (prompt, chosen, rejected)"
        )
    prompt, chosen, rejected = r.get("prompt"), r.get("chosen"), r.get("rejected")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(x, str) and x.strip() for x in (chosen, rejected)):
        raise UserError(f"{at} is not a held-out pair: it needs a prompt (text or messages), chosen and rejected text")
    rest = {k: v for k, v in r.items() if k not in ("prompt", "chosen")}
    return {**rest, "messages": [*prompt, {"role": "assistant", "content": chosen}]}


def prompt_of(row: dict) -> Prompt:
    """What the model answers for a held-out row: the conversation before its last assistant turn, or the
    Alpaca instruction and input."""
    return row["messages"][:-1] if "messages" in row else (row["instruction"], row.get("input") or None)


def unseen(rows: list[dict], seen: list[dict]) -> list[dict]:
    """The rows whose prompt is not among `seen`'s: fresh test rows from a generator that may repeat a trained one."""
    known = {repr(prompt_of(r)) for r in seen}
    return [r for r in rows if repr(prompt_of(r)) not in known]


def family_of(row: dict) -> str:
    return str(row.get("family") or NO_FAMILY)


def is_verifiable(row: dict) -> bool:
    return bool(row.get("verifiable", False))


def response_nll(
    model, tok, template: PromptTemplate, rows: list[dict], max_length: int, batch_size: int
) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) over each row's response tokens, the prompt masked as in training."""
    import torch
    import torch.nn.functional as F

    if template.kind != "chat" and any("messages" in r for r in rows):
        raise UserError(
            "this run trained on single-turn Alpaca prompts, so held-out conversations cannot be masked as in "
            "its training; evaluate Alpaca rows, or a run trained on conversations"
        )
    enc = [
        encode_conversations(template, tok, [r["messages"]], max_length)[0][:2]
        if "messages" in r
        else template.encode(tok, r["instruction"], r.get("input") or None, r["output"], max_length)[:2]
        for r in rows
    ]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(enc[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(enc[i][0])
            ids[row, :n] = torch.tensor(enc[i][0])
            labels[row, :n] = torch.tensor(enc[i][1])
            mask[row, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        target = labels[:, 1:].to(logits.device)
        keep = target != IGNORE_INDEX
        # Only the response positions are upcast: the full float32 logits would be batch x length x vocab.
        nll = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(
            0, keep.nonzero()[:, 0].cpu(), nll.double().cpu()
        )
        for row, i in enumerate(batch):
            out[i] = (per_row[row].item(), int(keep[row].sum()))
    return out


def generation_budget(tok, rows: list[dict], max_new_tokens: int) -> int:
    longest = max(len(tok(r["output"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(max_new_tokens, longest + VERIFIABLE_MARGIN_TOKENS)


def rejected_nll(model, tok, template: PromptTemplate, rows: list[dict], cfg: Config) -> dict[int, tuple[float, int]]:
    """The rejected answer's (summed cross-entropy, tokens) for each held-out pair, by row index: the same prompt
    as the chosen answer's (the row's conversation before its last turn), masked as in training."""
    pairs = [i for i, r in enumerate(rows) if "rejected" in r]
    convs = [
        {"messages": [*rows[i]["messages"][:-1], {"role": "assistant", "content": rows[i]["rejected"]}]} for i in pairs
    ]
    nll = response_nll(model, tok, template, convs, cfg.data.max_length, cfg.train.per_device_eval_batch_size)
    return dict(zip(pairs, nll))


def measure(cfg: Config, run: RunDir, use: str, rows: list[dict]) -> dict:
    """Load one model, score it on every row: loss, answers, exact match / ROUGE-L."""
    t0 = time.time()
    model, tok, template, what = load_for_inference(cfg, run, use)
    nll = response_nll(model, tok, template, rows, cfg.data.max_length, cfg.train.per_device_eval_batch_size)
    rejected = rejected_nll(model, tok, template, rows, cfg)
    answers = [""] * len(rows)
    greedy = cfg.inference.model_copy(update={"do_sample": False})
    budgets = {}
    for verifiable in (True, False):
        idx = [i for i, r in enumerate(rows) if is_verifiable(r) == verifiable]
        if not idx:
            continue
        n_new = (
            generation_budget(tok, [rows[i] for i in idx], greedy.max_new_tokens)
            if verifiable
            else greedy.max_new_tokens
        )
        budgets["verifiable" if verifiable else "open_ended"] = n_new
        got = generate(
            model,
            tok,
            template,
            [prompt_of(rows[i]) for i in idx],
            greedy.model_copy(update={"max_new_tokens": n_new}),
            progress=True,
        )
        for i, a in zip(idx, got):
            answers[i] = a
    del model
    per_row = []
    for r, a, (s, n) in zip(rows, answers, nll):
        score = exact_match(a, r["output"]) if is_verifiable(r) else rouge_l(a, r["output"])
        per_row.append({"answer": a, "score": score, "nll_sum": s, "tokens": n})
    for i, (s, _) in rejected.items():
        per_row[i]["rejected_nll_sum"] = s
    log.info("%s: scored %d rows in %.0fs", what, len(rows), time.time() - t0)
    return {"weights": what, "rows": per_row, "max_new_tokens": budgets, "seconds": round(time.time() - t0, 1)}


def preference(rows: list[dict], base: dict, tuned: dict) -> dict | None:
    """Held-out preference accuracy (the share of pairs whose chosen answer gets a higher summed log-probability
    than the rejected one, in %) and the mean margin (chosen minus rejected log-probability, nats), both models;
    None without pairs."""
    idx = [i for i, r in enumerate(rows) if "rejected" in r]
    if not idx:
        return None
    out = {"pairs": len(idx)}
    for name, m in (("base", base), ("fine_tuned", tuned)):
        margins = [m["rows"][i]["rejected_nll_sum"] - m["rows"][i]["nll_sum"] for i in idx]
        out[name] = {
            "accuracy": round(100 * sum(x > 0 for x in margins) / len(idx), 2),
            "mean_margin": round(sum(margins) / len(idx), 4),
        }
    out["delta"] = {k: round(out["fine_tuned"][k] - out["base"][k], 4) for k in ("accuracy", "mean_margin")}
    return out


def _loss(parts: list[dict]) -> tuple[float | None, float | None]:
    n = sum(p["tokens"] for p in parts)
    if n == 0:
        return None, None
    loss = sum(p["nll_sum"] for p in parts) / n
    return round(loss, 4), round(math.exp(min(loss, 50.0)), 3)


def aggregate(rows: list[dict], base: dict, tuned: dict) -> dict:
    """Overall and per-family metrics for both models: eval loss/perplexity, exact match %, ROUGE-L x100."""

    def block(idx: list[int]) -> dict:
        out = {}
        for name, m in (("base", base), ("fine_tuned", tuned)):
            parts = [m["rows"][i] for i in idx]
            loss, ppl = _loss(parts)
            ver = [parts[k]["score"] for k, i in enumerate(idx) if is_verifiable(rows[i])]
            opn = [parts[k]["score"] for k, i in enumerate(idx) if not is_verifiable(rows[i])]
            out[name] = {
                "eval_loss": loss,
                "perplexity": ppl,
                "exact_match": round(100 * sum(ver) / len(ver), 2) if ver else None,
                "rouge_l": round(100 * sum(opn) / len(opn), 2) if opn else None,
            }
        out["rows"] = len(idx)
        out["verifiable_rows"] = sum(1 for i in idx if is_verifiable(rows[i]))
        out["delta"] = {
            k: (
                round(out["fine_tuned"][k] - out["base"][k], 4)
                if out["base"][k] is not None and out["fine_tuned"][k] is not None
                else None
            )
            for k in ("eval_loss", "perplexity", "exact_match", "rouge_l")
        }
        return out

    fams = defaultdict(list)
    for i, r in enumerate(rows):
        fams[family_of(r)].append(i)
    families = {}
    for fam in sorted(fams, key=lambda f: (not all(is_verifiable(rows[i]) for i in fams[f]), f)):
        b = block(fams[fam])
        b["metric"] = (
            "exact_match"
            if b["verifiable_rows"] == b["rows"]
            else ("rouge_l" if b["verifiable_rows"] == 0 else "mixed")
        )
        families[fam] = b
    return {"overall": block(list(range(len(rows)))), "families": families}


def pick_examples(rows: list[dict], base: dict, tuned: dict, n: int = N_EXAMPLES) -> list[dict]:
    """n rows from as many families as possible, in file order, with both answers."""
    seen, picked = set(), []
    for i, r in enumerate(rows):
        if family_of(r) not in seen:
            seen.add(family_of(r))
            picked.append(i)
    picked += [i for i in range(len(rows)) if i not in picked]
    out = []
    for i in sorted(picked[:n]):
        r = rows[i]
        out.append(
            {
                "family": family_of(r),
                "verifiable": is_verifiable(r),
                "instruction": r["instruction"],
                "input": r.get("input") or "",
                "reference": r["output"],
                "base": base["rows"][i]["answer"],
                "fine_tuned": tuned["rows"][i]["answer"],
                "base_score": base["rows"][i]["score"],
                "fine_tuned_score": tuned["rows"][i]["score"],
            }
        )
    return out
