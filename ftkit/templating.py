"""Chat templates rendered under limits. A template is code (Jinja, in transformers' sandbox) that may come from
a user's .jinja file or a downloaded tokenizer: a huge loop would hang the run with no output, and one that
writes gigabytes would exhaust memory or abort the Rust tokenizer it is handed to. Every render here stops
with one line naming the template once it runs longer than RENDER_SECONDS or writes more than RENDER_CHARS.

The environment is transformers' own (the same filters, globals and {% generation %} tag), so a template
renders here exactly as tokenizer.apply_chat_template renders it, with the string operators that can build a
huge value in one step (`*`, `**`, `+`) checked before they run."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time

from .errors import UserError

# A real template renders a conversation in milliseconds; these are far past any honest one.
RENDER_SECONDS = 20.0
RENDER_CHARS = 64 * 2**20  # characters: past any context window a model has (64M characters ~ 16M tokens)


class TemplateLimit(Exception):
    """Raised inside a render that went past a limit; rendered as a UserError by `render`."""


@functools.cache
def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    theirs = _compile_jinja_template("{{ messages }}").environment

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise TemplateLimit(f"raised a number to the power {right}")
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
                if left * len(right) > RENDER_CHARS:
                    raise TemplateLimit(f"built a value of {left * len(right):,} items")
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
                if len(left) + len(right) > RENDER_CHARS:
                    raise TemplateLimit(f"built a value of {len(left) + len(right):,} items")
            return super().call_binop(context, operator, left, right)

    env = LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[type(e) for e in theirs.extensions.values()]
    )
    env.filters["tojson"] = theirs.filters["tojson"]
    env.globals.update({k: theirs.globals[k] for k in ("raise_exception", "strftime_now")})
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str, name: str):
    """The template compiled once; a syntax error is the template's fault and says so (with its line)."""
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise UserError(
            f"the {name} chat template has a Jinja syntax error at line {e.lineno}: {e.message}; fix the template "
            "(the data is not at fault)"
        ) from None


@contextlib.contextmanager
def _deadline(seconds: float):
    """SIGALRM after `seconds`, in the main thread (where every render runs): it stops a loop that writes
    nothing, which a check between output chunks would never reach. Elsewhere the chunk checks alone apply."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TemplateLimit(f"ran for more than {seconds:g} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def render(source: str, name: str, **context) -> str:
    """The template rendered with `context` (messages, add_generation_prompt, the special tokens), within
    RENDER_SECONDS and RENDER_CHARS."""
    template = compile_template(source, name)
    out, size, t0 = [], 0, time.monotonic()
    try:
        with _deadline(RENDER_SECONDS):
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > RENDER_CHARS:
                    raise TemplateLimit(f"wrote more than {RENDER_CHARS:,} characters")
                if time.monotonic() - t0 > RENDER_SECONDS:
                    raise TemplateLimit(f"ran for more than {RENDER_SECONDS:g} s")
                out.append(chunk)
    except (TemplateLimit, MemoryError, RecursionError) as e:
        why = (
            str(e)
            if isinstance(e, TemplateLimit)
            else "ran out of memory"
            if isinstance(e, MemoryError)
            else ("nested past Python's recursion limit")
        )
        raise UserError(
            f"the {name} chat template was stopped: rendering one conversation {why}, far past what a chat "
            "template needs; fix its loops, or choose another data.prompt_template"
        ) from None
    return "".join(out)
