"""The one error type a user can fix; the CLI maps it to exit code 2."""

__all__ = ["PdvError"]


class PdvError(Exception):
    """Bad input or an infeasible request: the message says what is wrong and how to fix it."""
