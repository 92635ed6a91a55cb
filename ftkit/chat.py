"""The interactive chat REPL: multi-turn, streamed, with /reset, /system, /save and /help; Ctrl+C stops an
answer and keeps the partial text; transcripts are saved as JSON and never replace another file."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import Config, InferenceCfg
from .errors import UserError
from .generation import (
    check_fits_context,
    context_limit,
    fits_context,
    generation_kwargs,
    load_for_inference,
    static_cache_len,
)
from .jsonl import check_text, loads
from .paths import RunDir, atomic_write_text
from .prompts import PromptTemplate


def is_transcript(path: Path) -> bool:
    """A file /save wrote (and may replace or add to): JSON lines, each with the transcript's keys (an older
    /save wrote one indented JSON object, which parses whole)."""
    try:
        text = path.read_text(encoding="utf-8")
        objs = [loads(text)] if text.lstrip().startswith("{\n") else [loads(x) for x in text.splitlines()]
    except (OSError, ValueError):
        return False
    return bool(objs) and all(isinstance(o, dict) and {"saved", "messages", "template"} <= o.keys() for o in objs)


CHAT_HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone "
    "restores the training one), /save PATH (the conversation as a messages JSON line; a .jsonl file of them "
    "collects conversations, and is training data), /quit. Ctrl+C stops an answer."
)


class StopFlag:
    """Set from the SIGINT handler; generate checks it after every token (a StoppingCriteria)."""

    def __init__(self):
        self.stop = False

    def criteria(self):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        flag = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), flag.stop, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Stop()])

    @contextlib.contextmanager
    def on_sigint(self):
        """While inside: Ctrl+C sets the flag instead of raising KeyboardInterrupt."""
        self.stop = False
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: setattr(self, "stop", True))
        except ValueError:  # not the main thread: no handler, generation runs to its end
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class ChatSession:
    """A multi-turn conversation with the model in the training prompt format (see the module docstring)."""

    def __init__(self, model, tok, template: PromptTemplate, icfg: InferenceCfg, what: str = "model", out=None):
        self.model, self.tok, self.template, self.icfg, self.what = model, tok, template, icfg, what
        self.system: str | None = template.system_prompt
        self.history: list[dict] = []
        self.out = out or sys.stdout
        self.flag = StopFlag()

    def print(self, *args, **kw) -> None:
        print(*args, file=self.out, flush=True, **kw)

    def prompt_ids(self, message: str, history: list[dict]) -> list[int]:
        # The training template's rendering (an Alpaca one puts the earlier turns in the Input field), with
        # this session's system prompt.
        turns = [{"role": m["role"], "content": m["content"]} for m in history]
        return replace(self.template, system_prompt=self.system).messages_prompt_ids(
            self.tok, turns + [{"role": "user", "content": message}]
        )

    def fit(self, message: str) -> tuple[list[int], int]:
        """Prompt ids for the next turn, dropping the oldest turns until prompt + answer fit the context."""
        new = self.icfg.max_new_tokens
        history, dropped = list(self.history), 0
        ids = self.prompt_ids(message, history)
        while not fits_context(self.model, len(ids), new) and history:
            history, dropped = history[2:], dropped + 1
            ids = self.prompt_ids(message, history)
        check_fits_context(self.model, len(ids), new, "the message", "send something shorter")
        return ids, dropped

    def reply(self, message: str) -> tuple[str, bool]:
        """Stream the answer to `message`; (answer, interrupted). Both turns are added to the history."""
        import torch
        from transformers import TextStreamer

        ids, dropped = self.fit(message)
        if dropped:
            self.print(f"(the oldest {dropped} exchange(s) no longer fit the context and are left out)")
        kw = generation_kwargs(self.icfg, self.template, self.tok)
        if kw.get("cache_implementation") == "static":
            kw["max_cache_len"] = static_cache_len(len(ids), self.icfg.max_new_tokens, context_limit(self.model))
        streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        with self.flag.on_sigint(), torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids], device=self.model.device),
                streamer=streamer,
                stopping_criteria=self.flag.criteria(),
                **kw,
            )
        interrupted = self.flag.stop
        answer = self.tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        self.print("\n[stopped; the partial answer is kept]" if interrupted else "")
        self.history.append({"role": "user", "content": message})
        self.history.append({"role": "assistant", "content": answer, **({"interrupted": True} if interrupted else {})})
        return answer, interrupted

    def transcript(self) -> dict:  # is_transcript recognises these keys
        """A `messages` row that dataset.py reads (the system prompt beside the turns, as ShareGPT keeps it);
        an answer cut short by Ctrl+C is kept but marked "train": false, so it never teaches a cut answer."""
        return {
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": self.what,
            "template": self.template.kind,
            "system": self.system,
            "messages": [{**m, "train": False} if m.get("interrupted") else m for m in self.history],
            "settings": self.icfg.model_dump(mode="json"),
        }

    def save(self, path: Path) -> str:
        """Write the transcript as one JSON line: a file of them is training data (data.path). A .jsonl
        file of earlier transcripts gets the new one appended; any other transcript file is replaced."""
        row = json.dumps(self.transcript(), ensure_ascii=False) + "\n"
        if path.suffix == ".jsonl" and path.is_file():
            atomic_write_text(path, path.read_text(encoding="utf-8") + row)
            return "added"
        atomic_write_text(path, row)
        return "saved"

    def handle(self, line: str) -> bool:
        """One line typed by the user; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd == "reset":
            self.history.clear()
            self.print("(conversation cleared)")
        elif cmd == "system":
            self.system = arg or self.template.system_prompt
            self.print(f"(system prompt: {self.system!r})" if self.system else "(no system prompt)")
        elif cmd == "save":
            if not arg:
                self.print("usage: /save PATH")
                return True
            path = Path(arg).expanduser()
            if path.exists() and not is_transcript(path):
                self.print(
                    f"({path} exists and is not a transcript saved by /save; it is left untouched: pick another PATH)"
                )
                return True
            try:
                how = self.save(path)
                self.print(f"({how} {len(self.history)} messages to {path})")
            except OSError as e:
                self.print(f"(could not save to {path}: {e.strerror or e})")
        elif cmd == "help":
            self.print(CHAT_HELP)
        else:
            self.print(f"unknown command /{cmd}; {CHAT_HELP}")
        return True


def chat(
    cfg: Config, run: RunDir, use: str | None = None, adapter: Path | None = None, read: Callable[[str], str] = input
) -> ChatSession:
    """The interactive REPL: read a line, answer it streamed, until /quit or end of input."""
    model, tok, template, what = load_for_inference(cfg, run, use or cfg.inference.use, adapter)
    session = ChatSession(model, tok, template, cfg.inference, what=what)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    session.print(f"chatting with the {what} model ({template.kind} template). {CHAT_HELP}")
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            session.print()
            break
        except KeyboardInterrupt:
            session.print("\n(Ctrl+C stops an answer; /quit or Ctrl+D leaves)")
            continue
        try:
            check_text(line, "that line", "type it again")
            if not session.handle(line):
                break
        except UserError as e:
            session.print(f"error: {e}")
        except KeyboardInterrupt:
            session.print("\n(interrupted)")
    return session
