"""The contract every entry point keeps with the user: a UserError (ftkit/errors.py) ends as one line on stderr
and exit code 2; the shared argument parser, logging, and the redaction of hub tokens from all output."""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import signal
import sys
import warnings
from typing import Callable, Sequence

from .errors import UserError

# -- logging and errors ------------------------------------------------------------------------------
# Every entry point runs through `run_main`, so that a mistake the user can fix (a typo in the config, a
# missing file) ends as one line on stderr and exit code 2, while a real bug still shows its traceback.

log = logging.getLogger("ftkit")

# Exit code for bad input, distinct from 1 (crash) so that scripts and CI can tell the two apart.
EXIT_USAGE = 2


# OSErrors that are the machine's state, never a bug of ours (a full or read-only disk, a file the user made
# unwritable, a path longer than the file system allows), with the fix each needs.
_MACHINE_ERRNOS = {
    errno.ENOSPC: "free space on that disk, or write to another one",
    errno.EDQUOT: "free space within your disk quota, or write to another disk",
    errno.EFBIG: "write to a file system that allows larger files",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "make it writable (chmod), or write to another folder",
    errno.EPERM: "make it writable (chmod, or chattr -i for an immutable file), or write to another folder",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def machine_error(e: OSError) -> UserError | None:
    """The one-line error for an OSError of the machine's state (see _MACHINE_ERRNOS); None for any other."""
    fix = _MACHINE_ERRNOS.get(e.errno)
    if fix is None:
        return None
    where = f" at '{e.filename}'" if e.filename else " while writing"
    return UserError(f"{e.strerror or os.strerror(e.errno)}{where}; {fix}")


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """Our INFO lines always; the libraries' own warnings (transformers, PEFT, TRL, ...: deprecations, settings
    they override, weights they could not load) shown as they emit them, unless `quiet`; their debug output
    with `debug`."""
    level = logging.DEBUG if debug else logging.INFO
    # Whatever reaches the terminal (our logs, print, library output) passes through `redact` first.
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), RedactStream):
            setattr(sys, name, RedactStream(getattr(sys, name)))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True
    )
    # Library chatter (info) drowns the lines a user acts on: warnings only, unless debugging; --quiet keeps
    # errors only. The libraries' warnings say what they changed or ignored, which a user needs to see.
    lib_level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    for noisy in (
        "transformers",
        "datasets",
        "accelerate",
        "peft",
        "trl",
        "bitsandbytes",
        "httpx",
        "urllib3",
        "filelock",
    ):
        logging.getLogger(noisy).setLevel(lib_level)
    # bitsandbytes warns on every CPU import that an optional hub kernel is absent; it falls back fine.
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if debug else logging.ERROR)
    # transformers and datasets set their loggers' level from these when first imported (after this runs);
    # a value the user exported wins, except that --quiet and --debug are asked for on this command line.
    verbosity = "debug" if debug else "error" if quiet else "warning"
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        if debug or quiet:
            os.environ[var] = verbosity
        else:
            os.environ.setdefault(var, verbosity)
    if quiet:
        # The libraries' warnings.warn() ones too (deprecations, FutureWarning), which logging levels miss.
        warnings.filterwarnings("ignore")
    if not debug:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().addFilter(RedactTokens())


_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{10,}\b")


# A HF_TOKEN value shorter than this is hidden by the pattern above or not at all: hub tokens are 37 characters,
# and a short value ("models", "1") is also a word or a digit, which would be starred in every path and number
# shown (an error naming 'runs/***/config.yaml' points nowhere), while hiding it protects no real token.
MIN_SECRET_CHARS = 8


def redact(text: str) -> str:
    """Hide anything shaped like a hub token, and the value of HF_TOKEN itself, wherever text is shown (the
    terminal, logs). Never applied to what is saved for the program to read back: that must stay as written."""
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if tok and len(tok.strip()) >= MIN_SECRET_CHARS:
        text = text.replace(tok, "***")
    return _TOKEN_RE.sub("hf_***", text)


class RedactStream:
    """sys.stdout/sys.stderr wrapper that redacts tokens from everything printed, libraries' output too."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text) if isinstance(text, str) else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(str(record.msg))
        if record.args:
            record.args = tuple(redact(str(a)) if isinstance(a, str) else a for a in record.args)
        return True


def _close_progress_bars() -> None:
    """An error raised mid-training leaves the Trainer's tqdm bars open; closed at exit they would print
    after the error line, which must be the last line on stderr."""
    tqdm_mod = sys.modules.get("tqdm.std") or sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm_mod, "tqdm", None), "_instances", None) or ())
    for bar in bars:
        try:
            bar.leave = False
            bar.close()
        except Exception:  # a bar half torn down by the exception: nothing left to print
            pass
    if bars:
        sys.stderr.write("\n")  # a closed bar leaves the cursor mid-line
    sys.stderr.flush()


def run_main(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Call a stage's CLI main; turn UserError into one line and exit code 2 unless --debug is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    setup_logging(debug, quiet="--quiet" in argv and not debug)
    # SIGTERM (kill, schedulers, timeouts) unwinds like Ctrl+C, so every stage's cleanup removes its temporary
    # files; finetune installs its own handler while training (checkpoint, then stop).
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        try:
            rc = main(argv)
        finally:
            # A SIGTERM that lands after main returned (an export just finished) raises Terminated here, inside
            # the handlers below, instead of from a `finally` beside them, which nothing would catch.
            signal.signal(signal.SIGTERM, before)
    except (UserError, OSError) as e:
        err = e if isinstance(e, UserError) else machine_error(e)
        if debug or err is None:
            raise
        _close_progress_bars()
        print(f"error: {redact(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated:
        signal.signal(signal.SIGTERM, before)  # when it landed before the restore above could run
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(rc or 0)


class Terminated(BaseException):
    """SIGTERM, raised where the program is: `finally` and `except BaseException` clean up as on Ctrl+C, while
    handlers meant for Ctrl+C alone (the chat REPL's) let it through."""


def _terminated(signum, frame) -> None:
    raise Terminated


def build_parser(description: str, config_required: bool = False) -> argparse.ArgumentParser:
    """The CLI every stage shares: --config, dotted overrides, --debug; stages add their own flags."""
    # No abbreviations: `--debu` would silently parse as --debug, and a flag added later could change what an
    # abbreviation a user scripted means.
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--config", required=config_required, help="YAML config; without it, the most recent run's saved config is used"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument(
        "--quiet", action="store_true", help="hide the libraries' warnings (transformers, PEFT, TRL, datasets)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides applied after the YAML, e.g. train.max_steps=10 "
        "(also as --train.max_steps=10 or --train.max_steps 10)",
    )
    return p


def flag_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `--section.key=value` and `--section.key value` (the flag style of transformers' HfArgumentParser,
    Axolotl and LLaMA-Factory) out of argv as `section.key=value` overrides; the rest goes to argparse. A flag
    that is another tool's name for a config key (`--lora_r 8`, `--output_dir x`) is an error naming the key."""
    from .config import SECTIONS, alias_hint

    actions = parser._option_string_actions  # argparse keeps no public map
    rest: list[str] = []
    found: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if _is_override(tok, SECTIONS) and not _value_of_option(actions, argv[i - 1] if i else ""):
            # Anywhere on the line: argparse takes positionals in one run, so `--resume train.max_steps=6`
            # after an earlier override would be "unrecognized"; and an option's optional value (--adapter
            # [DIR]) is no place for a setting.
            found.append(tok)
            i += 1
            continue
        if not tok.startswith("--") or name in actions or tok == "--":
            rest.append(tok)
            i += 1
            continue
        key = name[2:]
        if key.split(".")[0] not in SECTIONS:
            hint = alias_hint(key)
            if hint:
                raise UserError(f"unknown option '{name}'; this project calls it {hint}: write --{hint}=VALUE")
            rest.append(tok)  # argparse names it as unrecognized
            i += 1
            continue
        if not eq:
            # A value may start with "-" (train.warmup_steps -1 is a number); a following --flag is not one.
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"option '{name}' needs a value; write {name}=VALUE or {name} VALUE")
            value = argv[i + 1]
            i += 1
        found.append(f"{key}={value}")
        i += 1
    return rest, found


def _is_override(tok: str, sections) -> bool:
    return re.match(r"^(\w+)\.\w+=", tok) is not None and tok.split(".", 1)[0] in sections


def _value_of_option(actions: dict, prev: str) -> bool:
    """Whether the token after `prev` is that option's required value (`--prompt train.x=1` asks about it)."""
    action = actions.get(prev)
    return action is not None and action.nargs not in (0, "?", "*")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    # argparse exits 2 on its own errors already; keep its message one line and name the fix.
    def error(message: str):
        m = re.match(r"unrecognized arguments: (--[\w-]+)", message)
        known = [o for a in parser._actions for o in a.option_strings]  # argparse keeps no public list
        flag = m and m[1].replace("_", "-")
        # An abbreviation (refused: allow_abbrev=False) names the one flag it starts, however short it is.
        starts = [o for o in known if flag and o.startswith(flag)]
        close = starts[:1] if len(starts) == 1 else m and difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        raise UserError(f"{message}; " + (f"did you mean {close[0]}?" if close else "see --help"))

    parser.error = error  # type: ignore[method-assign]
    rest, flagged = flag_overrides(parser, argv)
    ns = parser.parse_args(rest)
    if hasattr(ns, "overrides"):
        # Flag-style overrides apply after the positional ones: the later of two values for a key wins.
        ns.overrides = [*ns.overrides, *flagged]
    return ns
