"""The one user-facing error type and the helper that turns a library's exception into it. Alone on the ground
floor: every module raises UserError, so this file imports nothing from ftkit (cli.py turns it into one line on
stderr and exit code 2)."""

from __future__ import annotations

import contextlib


class UserError(Exception):
    """A problem in the user's input: config, data, paths, model choice. The message names the fix."""


@contextlib.contextmanager
def user_errors(what: str, fix: str, types: tuple[type[BaseException], ...] = (OSError, ValueError)):
    """Turn a library's exception of `types` inside the block into one line: "<what>: <its first line>; <fix>".
    A library's message is often many lines (a traceback's worth); its first line says what went wrong."""
    try:
        yield
    except types as e:
        raise UserError(f"{what}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}; {fix}") from None
