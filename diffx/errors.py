"""User-facing errors: the CLI prints these as one line, without a stack trace.

Imports nothing from diffx, so every module may use it.
"""

from __future__ import annotations


class DiffxError(Exception):
    """A problem with the user's input (a config key, a file, a path), not a bug in diffx.

    The message must name the offending key or file and say what was expected.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if empty): errors quote a cause in one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def as_diffx_error(e: BaseException) -> DiffxError | None:
    """The DiffxError behind ``e`` (Hydra wraps a constructor's error in InstantiationException)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DiffxError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
