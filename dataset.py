"""Training data: load records, check them, split train/eval, render prompts, mask all but the answers.

Reads:  `data.path` — a hub dataset id, or a local .json / .jsonl / .csv / .parquet file of Alpaca records
        (`instruction`, optional `input`, `output`), OpenAI `messages` or ShareGPT `conversations` rows
        (`data.format`, `data.columns`), or preference rows for train.method=dpo|kto|orpo|simpo (chosen/rejected
        pairs, KTO's prompt/completion/label; ftkit/pairs.py); the tokenizer of `model.name_or_path`.
Writes: <paths.output_dir>/dataset_report.json (row counts, token-length histogram, truncated, fully
        masked, empty-output and duplicate rows, two rendered examples with their label masks; for
        conversations also turns per row, tokens per role, trained share, cut and dropped conversations; for pairs
        the mean tokens of the prompt and each side, equal pairs dropped, empty sides, pairs cut at max_length and
        one rendered example of each side with its mask).

Run:
    python dataset.py --config configs/demo.yaml
    python dataset.py --config configs/llama3_alpaca.yaml data.path=/data/alpaca.json data.max_length=1024
    python dataset.py --config configs/llama3_alpaca.yaml data.path=chats.jsonl data.prompt_template=llama3
    python dataset.py --config configs/demo_dpo.yaml                  # preference pairs (train.method=dpo)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftkit.cli import build_parser, log, parse_args, run_main
from ftkit.config import Config
from ftkit.errors import UserError
from ftkit.models import load_tokenizer
from ftkit.pairs import load_clean_split, prepare, print_report
from ftkit.paths import RunDir, atomic_write_json, load_run_config
from ftkit.runlock import RunLock, check_unlocked, is_own_report, is_project_run


def main(cfg: Config) -> dict:
    run = RunDir(Path(cfg.paths.output_dir))
    if is_project_run(run.root):
        # Its dataset_report.json describes the data that run trained on; a report of other settings there
        # would misdescribe the run.
        raise UserError(
            f"'{run.root}' holds a training run, whose dataset_report.json describes the data it trained "
            "on; set paths.output_dir to a new folder to write this report"
        )
    check_unlocked(run.root)
    if run.dataset_report.exists() and not is_own_report(run.dataset_report):
        raise UserError(
            f"'{run.dataset_report}' exists and was not written by dataset.py; it is left untouched: set "
            "paths.output_dir to a new folder"
        )
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"paths.output_dir '{run.root}' is a file, not a folder; choose a new folder")
    loaded = load_clean_split(cfg.data, cfg.train.method)  # data errors first: they need no tokenizer
    tok = load_tokenizer(cfg)
    prep = prepare(cfg, tok, loaded)
    print_report(prep.report)
    created = not run.root.exists()
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        with RunLock(run.root, "dataset.py"):
            atomic_write_json(run.dataset_report, prep.report)
    except OSError:
        if created:  # made a moment ago, so it holds nothing but our lock: a failed write leaves no folder
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    log.info("wrote %s", run.dataset_report)
    return prep.report


def cli(argv) -> None:
    a = parse_args(build_parser(__doc__, config_required=True), argv)
    main(load_run_config(a.config, a.overrides))


if __name__ == "__main__":
    run_main(cli)
