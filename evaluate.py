"""Did fine-tuning help? Base model vs fine-tuned model on the rows held out from training.

Reads:  <run>/config.yaml, <run>/prompt_template.json, <run>/eval_rows.jsonl (the held-out rows finetune.py
        wrote; or --rows FILE), <run>/train_log.jsonl (for the loss curves), the base at
        `model.name_or_path`, and the fine-tuned weights: <run>/merged/ when present, else base +
        <run>/adapter/ (`inference.use` or --merged / --adapter force one).
Writes: <run>/eval/ (atomically: a failed evaluation leaves the previous eval/ untouched, or none):
          eval_report.json  eval loss and perplexity over response tokens, exact match (normalized, rows
                            with `verifiable: true`) and ROUGE-L F1 (the other rows), overall and per task
                            family (`family`), base vs fine-tuned, and every row's answers and scores;
          eval_report.md    the same as a table, five example prompts with both answers, and the plots:
          loss_curves.png   training and in-loop eval loss from train_log.jsonl;
          before_after.png  per-family scores and eval loss, base vs fine-tuned;
        and prints the before/after table. With --lm-eval, also EleutherAI's lm-evaluation-harness on the same
        rows as a local task (ftkit/harness.py), base vs fine-tuned, in both reports.

A preference run's held-out pairs (train.method=dpo|kto|orpo|simpo): the chosen answer is the reference for
the scores above, and the preference accuracy is the share of pairs where the model's summed log-probability of
the chosen answer is above the rejected one's (the prompt masked as in training), with the mean margin between
the two (nats), base vs fine-tuned.

Held-out conversations (`messages` rows, as finetune.py holds out from conversation data): each is
answered from the turns before its last assistant turn, which is the reference; the loss is over all its
assistant turns, masked as in training.

Method: both models run in `model.dtype` (unquantized; the in-loop eval loss in train_log.jsonl comes
from the 4-bit base, so the two differ slightly). Loss is the token-weighted mean cross-entropy over the
response tokens, the prompt masked exactly as in training (`data.max_length` applies). Answers are
greedy, batched (`inference.batch_size`); open-ended rows get `inference.max_new_tokens` new tokens,
verifiable rows only the longest reference plus a margin (a longer answer cannot match exactly).

Run:
    python evaluate.py                                   # the most recent run
    python evaluate.py --config configs/demo.yaml        # the run in that config's paths.output_dir
    python evaluate.py --adapter inference.batch_size=8  # base + adapter even when merged/ exists
    python evaluate.py --lm-eval                         # + lm-evaluation-harness numbers (pip install lm_eval)
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ftkit import harness
from ftkit.cli import build_parser, log, parse_args, run_main
from ftkit.config import Config
from ftkit.errors import UserError
from ftkit.jsonl import read_jsonl, read_log_rows
from ftkit.models import resolve_model
from ftkit.paths import RunDir, atomic_dir, atomic_write_json, check_own_dir, stage_config
from ftkit.prompts import PromptTemplate
from ftkit.runlock import RunLock, check_unlocked, clean_tmp_leftovers
from ftkit.scoring import aggregate, family_of, held_out_row, is_verifiable, measure, pick_examples, preference


def read_rows(path: Path) -> list[dict]:
    """Held-out rows, checked: each needs an instruction and a non-empty reference answer (`output`), or is a
    conversation scored on its last assistant turn."""
    if not path.exists():
        raise UserError(
            f"'{path}' is missing; train with data.eval_size above 0 (finetune.py writes it) or pass --rows FILE"
        )
    rows = [
        held_out_row(r, f"{path}: line {n}")
        for n, r in read_jsonl(path, "rows file", "pass a .jsonl file of held-out rows with --rows")
    ]
    if not rows:
        raise UserError(f"'{path}' holds no rows to evaluate; set data.eval_size above 0 and train again")
    return rows


# eval/ is this stage's when it holds the report it writes.
OWN_EVAL = ("eval_report.json", "evaluate.py")


def preflight(cfg: Config, run: RunDir, use: str, rows_path: Path) -> tuple[list[dict], str]:
    """Every check that bad input can fail, before a model is loaded or anything is written."""
    if use == "base":
        raise UserError("inference.use=base would compare the base model with itself; use auto, merged or adapter")
    from ftkit.generation import choose_weights
    from ftkit.models import read_adapter_config

    PromptTemplate.load(run.prompt_template)  # a finished run has one; raises otherwise
    rows = read_rows(rows_path)
    use = choose_weights(cfg, run, use)
    if use == "adapter":
        read_adapter_config(run.adapter)
    resolve_model(cfg.model)  # the base must exist too
    return rows, use


# -- the report ------------------------------------------------------------------------------------
def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table_lines(report: dict) -> list[str]:
    """The before/after table, as Markdown (it prints readably as plain text too)."""
    lines = [
        "| family | rows | metric | base | fine-tuned | change | eval loss base | eval loss fine-tuned |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]

    def line(name: str, b: dict, metric: str) -> str:
        if metric == "mixed":
            metric = "exact_match"
        label = {"exact_match": "exact match %", "rouge_l": "ROUGE-L"}[metric]
        base, tuned = b["base"][metric], b["fine_tuned"][metric]
        change = None if base is None or tuned is None else tuned - base
        return (
            f"| {name} | {b['rows']} | {label} | {_fmt(base)} | {_fmt(tuned)} | {_fmt(change, '+.1f')} | "
            f"{_fmt(b['base']['eval_loss'], '.3f')} | {_fmt(b['fine_tuned']['eval_loss'], '.3f')} |"
        )

    for fam, b in report["families"].items():
        lines.append(line(fam, b, b["metric"]))
    o = report["overall"]
    if o["verifiable_rows"]:
        lines.append(line("**all verifiable**", report["verifiable"], "exact_match"))
    if o["rows"] - o["verifiable_rows"]:
        lines.append(line("**all open-ended**", report["open_ended"], "rouge_l"))
    pref = report.get("preference")
    if pref:
        for key, label, spec in (("accuracy", "preference accuracy %", ".1f"), ("mean_margin", "mean margin", ".3f")):
            b, t = pref["base"][key], pref["fine_tuned"][key]
            lines.append(
                f"| **held-out pairs** | {pref['pairs']} | {label} | {_fmt(b, spec)} | {_fmt(t, spec)} | "
                f"{_fmt(t - b, '+' + spec)} | | |"
            )
    lines.append(
        f"| **all rows** | {o['rows']} | perplexity | {_fmt(o['base']['perplexity'], '.2f')} | "
        f"{_fmt(o['fine_tuned']['perplexity'], '.2f')} | "
        f"{_fmt(o['delta']['perplexity'], '+.2f')} | {_fmt(o['base']['eval_loss'], '.3f')} | "
        f"{_fmt(o['fine_tuned']['eval_loss'], '.3f')} |"
    )
    return lines


def plot_loss_curves(log_rows: list[dict], dest: Path, base_loss: float | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in log_rows if "eval_loss" in r]
    if not train and not ev:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if ev:
        ax.plot(*zip(*ev), label="eval loss (held-out rows)", color="tab:orange", marker="o")
    if base_loss is not None:
        ax.axhline(
            base_loss,
            color="tab:gray",
            linestyle="--",
            linewidth=1,
            label=f"base model eval loss ({base_loss:.3f}, evaluate.py)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("Training and eval loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return True


def plot_before_after(report: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, base, tuned = [], [], []
    for fam, b in report["families"].items():
        metric = "exact_match" if b["metric"] != "rouge_l" else "rouge_l"
        names.append(f"{fam}\n({'EM' if metric == 'exact_match' else 'ROUGE-L'})")
        base.append(b["base"][metric] or 0.0)
        tuned.append(b["fine_tuned"][metric] or 0.0)
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(max(8, 1.3 * len(names) + 4), 4.5), gridspec_kw={"width_ratios": [max(2, len(names)), 1.3]}
    )
    x = range(len(names))
    w = 0.38
    ax1.bar([i - w / 2 for i in x], base, w, label="base", color="tab:gray")
    ax1.bar([i + w / 2 for i in x], tuned, w, label="fine-tuned", color="tab:green")
    ax1.set_xticks(list(x), names, fontsize=8, rotation=20, ha="right")
    ax1.set_ylim(0, 105)
    ax1.set_ylabel("score (exact match % / ROUGE-L x100)")
    ax1.set_title("Held-out rows by task family")
    ax1.legend()
    ax1.grid(axis="y", alpha=0.3)
    o = report["overall"]
    losses = [o["base"]["eval_loss"] or 0.0, o["fine_tuned"]["eval_loss"] or 0.0]
    ax2.bar(["base", "fine-tuned"], losses, color=["tab:gray", "tab:green"])
    for i, v in enumerate(losses):
        ax2.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax2.set_title("Eval loss (lower is better)")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def markdown(report: dict, has_curves: bool) -> str:
    m = report["models"]
    caps = report["settings"]["max_new_tokens"]
    budget = " / ".join(f"{n} ({k.replace('_', '-')} rows)" for k, n in caps.items())
    lines = [
        "# Evaluation: base vs fine-tuned",
        "",
        f"Run `{report['run']}`; {report['overall']['rows']} held-out rows from `{report['rows_file']}`.  ",
        f"Base: `{m['base']}`. Fine-tuned: `{m['fine_tuned']}` ({m['fine_tuned_weights']}).  ",
        f"Greedy decoding, at most {budget} new tokens (longer answers are cut off). "
        "Exact match is after normalization (whitespace, case, a final period); ROUGE-L is F1 x100; "
        "eval loss is the mean cross-entropy over response tokens.",
        "",
    ]
    lines += table_lines(report)
    lines += [""]
    if report.get("lm_eval"):
        lines += harness.markdown_lines(report["lm_eval"])
    if has_curves:
        lines += ["![training and eval loss](loss_curves.png)", ""]
    else:
        lines += ["(No loss curves: the run has no train_log.jsonl.)", ""]
    lines += ["![before and after](before_after.png)", "", "## Examples", ""]
    for k, ex in enumerate(report["examples"], 1):
        score = "exact match" if ex["verifiable"] else "ROUGE-L"
        lines += [f"### {k}. {ex['family']}", "", f"**Instruction:** {ex['instruction']}  "]
        if ex["input"]:
            lines += [f"**Input:** {ex['input']}  "]
        lines += [
            f"**Reference:** {ex['reference']}",
            "",
            f"- base ({score} {ex['base_score']:.2f}): {_quote(ex['base'])}",
            f"- fine-tuned ({score} {ex['fine_tuned_score']:.2f}): {_quote(ex['fine_tuned'])}",
            "",
        ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    one = " ".join(text.split())
    return f"`{one}`" if one and "`" not in one else (one or "(empty)")


# -- the stage -------------------------------------------------------------------------------------
def main(
    cfg: Config, run: RunDir, use: str | None = None, rows_path: Path | None = None, lm_eval: bool = False
) -> dict:
    t0 = time.time()
    rows_path = rows_path or run.eval_rows
    # 1. What can fail on bad input fails before any model loads.
    if lm_eval:
        harness.check_installed()
    check_unlocked(run.root)
    clean_tmp_leftovers(run.root, names=("eval",))
    check_own_dir(run.eval, *OWN_EVAL)  # before any model loads; atomic_dir checks again under the lock
    rows, tuned_use = preflight(cfg, run, use or cfg.inference.use, rows_path)
    log.info(
        "evaluating %d held-out rows (%d verifiable) with the base and the fine-tuned model",
        len(rows),
        sum(map(is_verifiable, rows)),
    )
    # 2. Both models answer and are scored on the same rows.
    base = measure(cfg, run, "base", rows)
    tuned = measure(cfg, run, tuned_use, rows)
    report = build_report(cfg, run, rows_path, rows, tuned_use, base, tuned, t0)
    check_scored(report)
    if lm_eval:
        report["lm_eval"] = run_harness(cfg, run, tuned_use, rows)
    # 3. <run>/eval/ written whole, then the table.
    write_report(run, report)
    log.info("wrote %s in %.0fs", run.eval, time.time() - t0)
    print(f"\nbase vs fine-tuned on {len(rows)} held-out rows ({run.eval / 'eval_report.md'}):")
    print("\n".join(table_lines(report)))
    if lm_eval:
        print("\n" + "\n".join(harness.markdown_lines(report["lm_eval"])))
    return report


def build_report(
    cfg: Config, run: RunDir, rows_path: Path, rows: list[dict], tuned_use: str, base: dict, tuned: dict, t0: float
) -> dict:
    """eval_report.json: the settings, the scores overall, by kind and by family, examples, and every row."""
    agg = aggregate(rows, base, tuned)
    ver = [i for i, r in enumerate(rows) if is_verifiable(r)]
    opn = [i for i, r in enumerate(rows) if not is_verifiable(r)]

    def sub(idx: list[int]) -> dict | None:  # the overall block, restricted to some rows
        if not idx:
            return None
        pick = lambda m: {"rows": [m["rows"][i] for i in idx]}
        return aggregate([rows[i] for i in idx], pick(base), pick(tuned))["overall"]

    return {
        "run": str(run.root),
        "rows_file": str(rows_path),
        "models": {
            "base": cfg.model.name_or_path,
            "fine_tuned": str(run.merged if tuned_use == "merged" else run.adapter),
            "fine_tuned_weights": tuned_use,
        },
        "settings": {
            "dtype": cfg.model.dtype,
            "greedy": True,
            "batch_size": cfg.inference.batch_size,
            "max_new_tokens": base["max_new_tokens"],
            "max_length": cfg.data.max_length,
        },
        "overall": agg["overall"],
        "preference": preference(rows, base, tuned),
        "verifiable": sub(ver),
        "open_ended": sub(opn),
        "families": agg["families"],
        "examples": pick_examples(rows, base, tuned),
        "rows": [
            {
                "family": family_of(r),
                "verifiable": is_verifiable(r),
                "instruction": r["instruction"],
                "input": r.get("input") or "",
                "reference": r["output"],
                "base": row_result(b),
                "fine_tuned": row_result(t),
            }
            for r, b, t in zip(rows, base["rows"], tuned["rows"])
        ],
        "seconds": {"base": base["seconds"], "fine_tuned": tuned["seconds"], "total": round(time.time() - t0, 1)},
    }


def row_result(m: dict) -> dict:
    """One model's answer to one row, as the report keeps it."""
    out = {
        "answer": m["answer"],
        "score": m["score"],
        "tokens": m["tokens"],
        "loss": round(m["nll_sum"] / m["tokens"], 4) if m["tokens"] else None,
    }
    if "rejected_nll_sum" in m:  # a pair: chosen minus rejected log-probability
        out["margin"] = round(m["rejected_nll_sum"] - m["nll_sum"], 4)
    return out


def check_scored(report: dict) -> None:
    """A loss of None or NaN means no response token was scored: a report of it would compare nothing."""
    for key in ("eval_loss", "perplexity"):
        for name in ("base", "fine_tuned"):
            v = report["overall"][name][key]
            if v is None or not math.isfinite(v):
                raise UserError(
                    f"the {name} model's {key} is {v}: no response tokens were scored; "
                    "check data.max_length against the held-out rows"
                )


def write_report(run: RunDir, report: dict) -> None:
    """<run>/eval/: the report (JSON and Markdown) and its plots, replaced as one folder."""
    with RunLock(run.root, "evaluate.py"), atomic_dir(run.eval, *OWN_EVAL) as tmp:
        has_curves = plot_loss_curves(
            read_log_rows(run.train_log), tmp / "loss_curves.png", report["overall"]["base"]["eval_loss"]
        )
        plot_before_after(report, tmp / "before_after.png")
        report["plots"] = ["loss_curves.png"] * has_curves + ["before_after.png"]
        atomic_write_json(tmp / "eval_report.json", report)
        (tmp / "eval_report.md").write_text(markdown(report, has_curves), encoding="utf-8")


def run_harness(cfg: Config, run: RunDir, tuned_use: str, rows: list[dict]) -> dict:
    """EleutherAI's lm-evaluation-harness on the same rows, base vs fine-tuned (the same weights as above)."""
    from ftkit.models import load_tokenizer, pick_device

    source, _ = resolve_model(cfg.model)
    tuned = (
        {"pretrained": str(run.merged)} if tuned_use == "merged" else {"pretrained": source, "peft": str(run.adapter)}
    )
    return harness.evaluate_models(
        {"base": {"pretrained": source}, "fine_tuned": tuned},
        rows,
        PromptTemplate.load(run.prompt_template),
        load_tokenizer(cfg, str(run.adapter), True),
        dtype=cfg.model.dtype,
        device=pick_device(cfg.inference.device),
        batch_size=cfg.inference.batch_size,
    )


def cli(argv) -> None:
    p = build_parser(__doc__)
    p.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="a .jsonl of rows to evaluate instead of <run>/eval_rows.jsonl (keep them out of training)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merged", dest="use", action="store_const", const="merged", help="fine-tuned = <run>/merged")
    g.add_argument("--adapter", dest="use", action="store_const", const="adapter", help="fine-tuned = base + adapter")
    p.add_argument(
        "--lm-eval",
        action="store_true",
        help="also run EleutherAI's lm-evaluation-harness on the held-out rows (a local task), base vs fine-tuned",
    )
    a = parse_args(p, argv)
    cfg, run = stage_config(a.config, a.overrides)
    main(cfg, run, a.use, a.rows, lm_eval=a.lm_eval)


if __name__ == "__main__":
    run_main(cli)
