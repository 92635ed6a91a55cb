"""Rebuild the demo's training data (ftkit/demo_data.py holds the generator; this is its command line).

Run:
    python data/generate_demo_data.py                      # rebuilds the shipped data/demo_tasks.jsonl
    python data/generate_demo_data.py --conversations      # rebuilds the shipped data/demo_conversations.jsonl
    python data/generate_demo_data.py --pairs              # rebuilds the shipped data/demo_pairs.jsonl (DPO demo)
    python data/generate_demo_data.py --pairs --from-base configs/demo_dpo.yaml   # rejected = the base's own answers
    python data/generate_demo_data.py --family extraction --seed 5 --per-family 260 --out data/demo_grpo.jsonl
                                                           # rebuilds the shipped GRPO demo's prompts (one family)
    python data/generate_demo_data.py --seed 1 --per-family 50 --out /tmp/tasks.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

# Run as a script from anywhere: the generator lives in the package beside data/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftkit.demo_data import (  # noqa: E402
    CONVERSATION_FAMILIES,
    DEFAULT_CONVERSATIONS_OUT,
    DEFAULT_CONVERSATIONS_PER_FAMILY,
    DEFAULT_OUT,
    DEFAULT_PER_FAMILY,
    DEFAULT_SEED,
    FAMILIES,
    VERIFIABLE_FAMILIES,
    generate,
    generate_conversations,
    to_jsonl,
    write_atomic,
)
from ftkit.demo_pairs import DEFAULT_PAIRS_OUT, DEFAULT_PAIRS_PER_FAMILY, base_answers, generate_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    ap.add_argument(
        "--per-family",
        type=int,
        default=None,
        help=f"rows per verifiable family (default {DEFAULT_PER_FAMILY}; with --conversations, conversations per "
        f"family, default {DEFAULT_CONVERSATIONS_PER_FAMILY})",
    )
    ap.add_argument("--out", type=Path, default=None, help="output .jsonl (default: the shipped file)")
    ap.add_argument(
        "--conversations",
        action="store_true",
        help=f"write the multi-turn section instead (messages rows; default --out {DEFAULT_CONVERSATIONS_OUT.name}, "
        f"--per-family {DEFAULT_CONVERSATIONS_PER_FAMILY})",
    )
    ap.add_argument(
        "--pairs",
        action="store_true",
        help=f"write preference pairs of the tasks instead (chosen: the answer, rejected: a plausible wrong one; "
        f"default --out {DEFAULT_PAIRS_OUT.name}, --per-family {DEFAULT_PAIRS_PER_FAMILY})",
    )
    ap.add_argument(
        "--from-base",
        metavar="CONFIG",
        default=None,
        help="with --pairs: the base model of CONFIG answers every task first, and its wrong answers are the rejected "
        "ones (a right one is replaced by a corruption)",
    )
    ap.add_argument(
        "--family",
        choices=VERIFIABLE_FAMILIES,
        default=None,
        help="keep only this verifiable family's rows (the GRPO demo trains on one family, rewarded by its answers)",
    )
    args = ap.parse_args(argv)
    try:
        if args.pairs:
            tasks = generate(args.seed, DEFAULT_PER_FAMILY)
            per_family = args.per_family or DEFAULT_PAIRS_PER_FAMILY
            base = None
            if args.from_base:
                from ftkit.config import load_config

                picked = generate_pairs(tasks, args.seed, per_family)
                base = base_answers(load_config(args.from_base), picked)
            rows = generate_pairs(tasks, args.seed, per_family, base)
            write_atomic(args.out or DEFAULT_PAIRS_OUT, to_jsonl(rows))
            print(f"wrote {len(rows)} pairs to {args.out or DEFAULT_PAIRS_OUT}")
            return 0
        if args.conversations:
            rows = generate_conversations(args.seed, args.per_family or DEFAULT_CONVERSATIONS_PER_FAMILY)
        else:
            rows = generate(args.seed, args.per_family or DEFAULT_PER_FAMILY)
            rows = [r for r in rows if r["family"] == args.family] if args.family else rows
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (DEFAULT_CONVERSATIONS_OUT if args.conversations else DEFAULT_OUT)
    write_atomic(out, to_jsonl(rows))
    counts = Counter(r["family"] for r in rows)
    if args.conversations:
        for family in CONVERSATION_FAMILIES:
            print(f"  {family:<16} {counts[family]:>5}")
        print(f"wrote {len(rows)} conversations to {out}")
        return 0
    args.out = out
    for family in FAMILIES:
        print(f"  {family:<16} {counts[family]:>5}")
    with_input = sum(1 for r in rows if r["input"])
    print(f"wrote {len(rows)} rows ({with_input} with input) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
