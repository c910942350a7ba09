"""The one error type a user can fix; the CLI maps it to exit code 2."""

__all__ = ["PdvError", "first_line"]


class PdvError(Exception):
    """Bad input or an infeasible request: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters: what a one-line
    PdvError quotes of a library's error."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]
