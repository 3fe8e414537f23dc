"""The one base class of errors caused by what a user gave (a path, a file, an option, a URI).

Its message names the problem and the fix, so the command lines print it as one line, without a
traceback (`diffusion.platform.cli.run`); any other exception is a bug and keeps its traceback.
"""


def excerpt(value, limit: int = 40) -> str:
    """A short rendering of a user's value for an error message: never the whole of a large input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InputError(Exception):
    """Unusable input; the message names it, what is wrong and what to do."""


class OptionError(InputError, ValueError):
    """An option (a flag, a config field, a request setting) out of its range or in conflict."""
