"""One exception type for every mistake a user can make.

A `PruneEvalError` carries a one-line message that names the bad value and what is allowed. The
command-line entry points print it without a traceback and exit non-zero, so a user sees
"unknown method 'visonzip'; did you mean 'visionzip'? choices: ..." instead of a stack dump.
Anything else that escapes is a bug in prune_eval and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PruneEvalError(Exception):
    """A user-facing error: bad config, bad input file, missing weights or data."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" when a close choice exists, else ""."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> PruneEvalError:
    """The standard "unknown X 'v'; did you mean 'w'? choices: a, b, c" error."""
    choices = sorted(str(c) for c in choices)
    return PruneEvalError(
        f"unknown {what} '{value}'{did_you_mean(str(value), choices)} choices: {', '.join(choices)}"
    )


def error_text(error: Exception, prog: str = "prune_eval") -> str:
    """What a command prints for a PruneEvalError: every line of the message prefixed
    "<prog>: error: ", except continuation lines (indented), which belong to the line above. Several
    independent problems (e.g. one line per missing input) are several lines, each self-contained."""
    return "\n".join(line if line[:1].isspace() else f"{prog}: error: {line}" for line in str(error).splitlines() or [""])
