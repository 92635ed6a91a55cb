"""EleutherAI's lm-evaluation-harness as a client (`evaluate.py --lm-eval`): the run's held-out rows become a
local harness task (a JSON-lines file and a task YAML in a temporary folder: no hub access), and the harness
scores the base and the fine-tuned model on it, so that its numbers sit beside the project's own in the report.

The task is a loglikelihood one: for each row, the prompt as the run's template renders it is the context and
the reference answer the continuation. The harness reports `acc` (the answer is exactly the model's greedy
continuation, token by token: a generation-free exact match) and `perplexity` (exp of minus the mean answer
log-likelihood per row). The harness tokenizes context + answer as one text, so its numbers can differ a little
from the project's eval loss, which tokenizes prompt and answer apart, as in training.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path

from .cli import log
from .errors import UserError

TASK = "ftkit_heldout"
PIP = "lm_eval==0.4.13"  # the version tested (tests/test_evaluate.py)


def check_installed() -> None:
    """Imported, not only found: a half-installed harness (a missing dependency) fails here, not mid-report."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            f"evaluate.py --lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed; "
            f"pip install {PIP}, or drop --lm-eval"
        ) from None


def task_yaml(rows_file: Path) -> str:
    """The harness task over a local JSON-lines file (datasets' json builder: nothing is downloaded)."""
    return (
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(rows_file))}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        # The rendered prompt ends where the answer starts; the harness's default " " would shift it.
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )


def write_task(folder: Path, rows: list[dict], template, tok) -> None:
    docs = [
        {"prompt": template.render_prompt(tok, r["instruction"], r.get("input") or None), "answer": r["output"]}
        for r in rows
    ]
    rows_file = folder / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(task_yaml(rows_file), encoding="utf-8")


def evaluate_models(
    models: dict[str, dict], rows: list[dict], template, tok, *, dtype: str, device: str, batch_size: int
):
    """{name: harness model_args} -> the report section: per model, the harness's acc and perplexity."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The Alpaca text relies on the tokenizer's BOS (as training does); a chat template writes its own.
    add_bos = template.kind != "chat" and tok.bos_token is not None
    out: dict = {
        "harness": f"lm-evaluation-harness {importlib.metadata.version('lm_eval')}",
        "task": f"{TASK}: the held-out rows, loglikelihood of the reference answer after the run's prompt",
        "rows": len(rows),
        "metrics": {
            "acc": "share of rows whose answer is exactly the greedy continuation",
            "perplexity": "exp(-mean answer log-likelihood per row)",
        },
    }
    with tempfile.TemporaryDirectory() as d:
        write_task(Path(d), rows, template, tok)
        tasks = TaskManager(include_path=d)
        for name, args in models.items():
            log.info("lm-evaluation-harness: %s model", name.replace("_", "-"))
            res = lm_eval.simple_evaluate(
                model="hf",
                model_args={**args, "dtype": dtype, "add_bos_token": add_bos},
                tasks=[TASK],
                task_manager=tasks,
                device=device,
                batch_size=batch_size,
                bootstrap_iters=0,  # no stderr estimates: seconds saved, and the report does not show them
                log_samples=False,
            )
            r = res["results"][TASK]
            out[name] = {"acc": r["acc,none"], "perplexity": r["perplexity,none"]}
    return out


def markdown_lines(section: dict) -> list[str]:
    b, t = section["base"], section["fine_tuned"]
    return [
        "## lm-evaluation-harness",
        "",
        f"{section['harness']}, task {section['task']} ({section['rows']} rows).",
        "",
        "| metric | base | fine-tuned |",
        "|---|---:|---:|",
        f"| acc (answer = greedy continuation) | {b['acc']:.3f} | {t['acc']:.3f} |",
        f"| perplexity of the answer | {b['perplexity']:.3g} | {t['perplexity']:.3g} |",
        "",
    ]
