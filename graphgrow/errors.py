"""The one exception type for mistakes a user can make."""
from __future__ import annotations

import difflib
from typing import Iterable


class GraphgrowError(Exception):
    """A user-caused error: bad spec, unknown op, impossible pass, wrong data path.

    Carries where it happened (file, line, column, node), or the ``option`` (argument of the
    Python API, e.g. ``insert_at``; the CLI shows it as ``--insert-at``) that was wrong, and a
    hint. ``str(err)`` is the one-line form the CLI prints:
    ``path:line:col: error: message [node 'x'] (hint: ...)`` or ``option: error: ...``.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, node: str | None = None, hint: str | None = None,
                 option: str | None = None):
        self.message = message
        self.option = option
        self.file = file
        self.line = line
        self.column = column
        self.node = node
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        where = self.file or self.option or "<spec>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: error: {self.message}"
        if self.node:
            text += f" [node '{self.node}']"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def __str__(self) -> str:
        return self.format()

    def located(self, **where) -> "GraphgrowError":
        """Fill in location fields that are still unknown, return self."""
        for key, value in where.items():
            if getattr(self, key) is None and value is not None:
                setattr(self, key, value)
        self.args = (self.format(),)
        return self


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt name, or None."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else None
