"""User-facing errors.

Every problem a user can fix (a bad option, a missing file, an impossible budget)
raises a subclass of :class:`BudgetpruneError` whose message is one line naming the
problem and the fix. The command line prints that line and exits with code 2; it
never shows a traceback for these.
"""


#: Line breaks and other control characters, as the escapes Python writes for them: a message
#: that quotes a file's text stays one line whatever the file holds.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
            if c != 0x09}


def printable(text: str) -> str:
    """``text`` with line breaks and terminal control characters escaped: safe to print from a file."""
    return str(text).translate(_ESCAPES)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), at most ``limit`` characters:
    what a one-line error quotes of an exception from torch or the standard library."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class BudgetpruneError(Exception):
    """Base class of the errors a user can act on; ``str(err)`` is one line."""

    def __str__(self) -> str:
        return printable(super().__str__())


class ConfigError(BudgetpruneError):
    """An option has a value that cannot work (unknown name, out-of-range number)."""


class BudgetError(ConfigError):
    """The budget is malformed or cannot be reached by any pruning of the model."""


class DataError(BudgetpruneError):
    """A dataset folder is missing, incomplete or holds malformed files."""


class DownloadError(DataError):
    """A download failed or a downloaded file did not match its checksum."""


class CheckpointError(BudgetpruneError):
    """A checkpoint or model file cannot be read or does not fit the model."""


class GraphError(BudgetpruneError):
    """A model cannot be traced, or holds an operation that cannot be pruned safely."""


class TrainingDiverged(BudgetpruneError):
    """The loss or the weights became NaN or infinite, or the loss exploded (see
    ``engine.DivergenceCheck``); the last good checkpoint is kept and the message says what to rerun."""


class ExportError(BudgetpruneError):
    """A model cannot be exported, or the exported file does not reproduce its outputs."""
