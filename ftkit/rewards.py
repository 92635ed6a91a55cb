"""GRPO's rewards (train.rewards): what a sampled completion earns, called by TRL's GRPOTrainer as it calls any
reward, `f(prompts=, completions=, completion_ids=, **columns) -> one number per completion`, where the columns are
the training row's: `answer` (the reference: an Alpaca row's output, a conversation's last assistant turn) and
whatever else the row carries (family, ...).

Built in, reading the row:
  exact_match  1 when the completion's answer equals the reference after the normalization evaluate.py scores with
               (whitespace, case, a final period), else 0.
  format       1 when the completion is one non-empty line (or, with train.reward_format_regex, matches that
               pattern in full), else 0.
  length       0 up to train.reward_length_limit completion tokens, then falling linearly to -1 at twice the limit.
A user's own FILE.py:FUNCTION runs the user's code: it is loaded with a warning that says so, and tried on one
training row (its reference as the completion) before the run folder is written, so a missing file or function,
one that raises, returns the wrong number of values, NaN or a non-number fails in a second with one line. What
fails later, during training, stops the run with the same kind of line and names the last checkpoint kept.

Every reward's values for the latest batch are kept (`Recorder`), so the run can write completions.jsonl: the
completions sampled at a logging step with each reward, to read what the model is learning.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .cli import log
from .config import BUILTIN_REWARDS, reward_name
from .errors import UserError
from .scoring import exact_match as scored_match


def exact_match(completions: list[str], answer: list[str | None], **_) -> list[float]:
    return [scored_match(c, a) if a is not None else math.nan for c, a in zip(completions, answer)]


def one_line(completions: list[str], pattern: str | None = None) -> list[float]:
    if pattern is not None:
        rx = re.compile(pattern)
        return [float(rx.fullmatch(c.strip()) is not None) for c in completions]
    return [float(bool(c.strip()) and "\n" not in c.strip()) for c in completions]


def length_penalty(completion_ids: list[list[int]], limit: int) -> list[float]:
    return [-min(1.0, max(0, len(ids) - limit) / limit) for ids in completion_ids]


@dataclass
class Reward:
    """One entry of train.rewards, callable as TRL calls a reward; values are checked, then recorded."""

    name: str
    fn: Callable
    user_code: bool
    recorder: "Recorder"
    run_hint: Callable[[], str] = field(default=lambda: "")

    @property
    def __name__(self) -> str:  # TRL names each reward's logged mean and std after it
        return self.name

    def __call__(self, prompts, completions, completion_ids, **kw) -> list[float]:
        try:
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kw)
            if inspect.iscoroutine(out):  # an async reward (TRL takes those too): awaited here, in this thread
                out = asyncio.run(out)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"reward {self.name} raised {type(e).__name__}: {e}; fix the function{self.run_hint()}"
            ) from e
        values = check_values(self.name, out, len(completions), self.run_hint())
        self.recorder.keep(self.name, prompts, completions, values, kw.get("answer"))
        return values


def check_values(name: str, out, n: int, hint: str = "") -> list[float]:
    """A reward's return value as floats: one finite number per completion (None, TRL's "no reward for this
    one", is kept as NaN, which TRL skips)."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise UserError(
            f"reward {name} returned {type(out).__name__}, not a list of numbers; return one number per "
            f"completion{hint}"
        )
    if len(out) != n:
        raise UserError(
            f"reward {name} returned {len(out)} values for {n} completions; return one per completion{hint}"
        )
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise UserError(
                f"reward {name} returned {v!r} ({type(v).__name__}) for completion {i}, not a number; return "
                f"floats{hint}"
            )
        f = float(v)
        if not math.isfinite(f):
            raise UserError(
                f"reward {name} returned {f} for completion {i}; return finite numbers (None skips one){hint}"
            )
        values.append(f)
    return values


class Recorder:
    """The latest batch's completions and each reward's values, for completions.jsonl."""

    def __init__(self):
        self.batch: dict = {}

    def keep(self, name: str, prompts, completions, values, answers) -> None:
        if self.batch.get("completions") is not completions:
            self.batch = {"prompts": prompts, "completions": completions, "answers": answers, "rewards": {}}
        self.batch["rewards"][name] = values

    def rows(self, step: int, weights: dict[str, float]) -> list[dict]:
        b = self.batch
        if not b:
            return []
        out = []
        for i, (p, c) in enumerate(zip(b["prompts"], b["completions"])):
            r = {k: (None if math.isnan(v[i]) else v[i]) for k, v in b["rewards"].items()}
            total = sum(weights[k] * v for k, v in r.items() if v is not None)
            answer = b["answers"][i] if b["answers"] else None
            out.append({"step": step, "prompt": p, "completion": c, "answer": answer, "rewards": r, "reward": total})
        return out


def builtin(name: str, t) -> Callable:
    if name == "exact_match":
        return exact_match
    if name == "format":
        return lambda completions, **_: one_line(completions, t.reward_format_regex)
    return lambda completion_ids, **_: length_penalty(completion_ids, t.reward_length_limit)


def check_files(t) -> None:
    """Each user reward's file exists (what --dry-run checks without running any of it)."""
    for spec in t.rewards:
        if spec not in BUILTIN_REWARDS:
            check_file(spec.rpartition(":")[0])


def check_file(file: str) -> None:
    if not Path(file).is_file():
        what = "is not a file" if Path(file).exists() else "does not exist"
        raise UserError(f"train.rewards: reward file {file} {what}; give FILE.py:FUNCTION with a real file")


def load_user_function(spec: str) -> Callable:
    """FILE.py:FUNCTION, imported from the file (relative to the working directory). This runs the file's code."""
    file, _, func = spec.rpartition(":")
    path = Path(file)
    check_file(file)
    log.warning(
        "train.rewards: loading %s, which runs its Python code in this process with your permissions; "
        "use only files you trust",
        path,
    )
    mod_spec = importlib.util.spec_from_file_location(f"ftkit_user_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"train.rewards: importing {file} raised {type(e).__name__}: {e}; fix the file") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"train.rewards: {file} has no function {func}; it has: {', '.join(names) or 'none'}")
    sys.modules.setdefault(mod_spec.name, module)
    return fn


def load(t, rows: list[dict], tok, run_hint: Callable[[], str] = lambda: "") -> list[Reward]:
    """train.rewards as TRL's reward functions, each tried once on the first training row (the reference as the
    completion, so exact_match scores 1) with TRL's arguments: a reward that cannot run fails here, before the
    run folder is written."""
    if "exact_match" in t.rewards:
        missing = next((r for r in rows if r.get("answer") is None), None)
        if missing is not None:
            raise UserError(
                f"reward exact_match needs a reference answer in every row; the row {missing['prompt'][-60:]!r} "
                "has none (a conversation that ends with a user turn); give it an assistant answer or drop "
                "exact_match from train.rewards"
            )
    recorder = Recorder()
    out = []
    for spec in t.rewards:
        user = spec not in BUILTIN_REWARDS
        fn = load_user_function(spec) if user else builtin(spec, t)
        out.append(Reward(reward_name(spec), fn, user, recorder, run_hint))
    if rows:
        # Before training no checkpoint exists: the errors end without the resume hint.
        for r in out:
            r.run_hint = lambda: " (tried on the first training row, before training)"
        try_once(out, rows[0], tok)
        for r in out:
            r.run_hint = run_hint
        recorder.batch = {}
    return out


def try_once(rewards: list[Reward], row: dict, tok) -> None:
    completion = row.get("answer") or "ok"
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    columns = {k: [v] for k, v in row.items() if k != "prompt"}
    noop = lambda *a, **k: None  # noqa: E731  (TRL's log_extra / log_metric, which a reward may call)
    for r in rewards:
        r(
            prompts=[row["prompt"]],
            completions=[completion],
            completion_ids=[ids],
            trainer_state=None,
            log_extra=noop,
            log_metric=noop,
            **columns,
        )


def weights(t) -> dict[str, float]:
    return dict(zip(map(reward_name, t.rewards), t.reward_weights or [1.0] * len(t.rewards)))
