"""Loading and tokenizing conversations: the time dataset.py (and finetune.py before training) spends turning a
JSONL file of `messages` rows into masked token ids, per stage (read, check, split, tokenize turn by turn).

Target (issue 14): 50k conversations under 60 s on 2 CPU cores. The rows are generated here (seeded): 1 to 4
user/assistant exchanges of 10-60 words each, a system turn in a third of them.

    python benchmarks/conversation_loading.py --rows 50000 --out benchmarks/results/conv_loading_cpu.json
Smoke run (make bench-smoke): the same stages on 300 rows.
    python benchmarks/conversation_loading.py --tiny --out /tmp/conv.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Results, versions  # noqa: E402
from ftkit.config import DataCfg  # noqa: E402
from ftkit.data import clean_records, encode_rows, load_records, split_records  # noqa: E402
from ftkit.prompts import PromptTemplate  # noqa: E402

WORDS = "the a model data river stone cloud answer question number seven table light paper house green".split()


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))

    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You are terse."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": f"{i} {text()}"}, {"role": "assistant", "content": text()}]
        rows.append({"messages": msgs})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--rows", type=int, help="conversations to generate (default 50000; --tiny: 300)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: 300 rows unless --rows")
    ap.add_argument("--template", default="chat", help="data.prompt_template (default: SmolLM2's own)")
    ap.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct", help="the tokenizer's folder")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.rows is None:
        a.rows = 300 if a.tiny else 50000
    import torch
    from transformers import AutoTokenizer

    # The load average says how much of the cores this run had: on a shared machine the same run takes
    # twice as long at a load of 4 on 2 cores.
    res = Results(
        rows=a.rows,
        template=a.template,
        threads=torch.get_num_threads(),
        load_average_before=os.getloadavg(),
        versions=versions(),
    )
    res.out = a.out
    tok = AutoTokenizer.from_pretrained(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conv.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.rows, 0)))
        d = DataCfg(path=str(path), max_length=a.max_length, prompt_template=a.template, eval_size=0.01)
        t0 = time.perf_counter()
        records, _ = load_records(d)
        t1 = time.perf_counter()
        rows, st = clean_records(records, d, str(path))
        t2 = time.perf_counter()
        train, _ = split_records(rows, d.eval_size, d.seed)
        template = PromptTemplate.from_config(d.prompt_template, tok, conversations=True)
        t3 = time.perf_counter()
        enc = encode_rows(train, template, tok, d, str(path))
        t4 = time.perf_counter()
    res.update(
        read_s=round(t1 - t0, 2),
        check_s=round(t2 - t1, 2),
        split_s=round(t3 - t2, 2),
        tokenize_s=round(t4 - t3, 2),
        total_s=round(t4 - t0, 2),
        train_rows=len(enc.rows),
        tokens=sum(enc.lengths),
        load_average_after=os.getloadavg(),
    )
    res.save()
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
