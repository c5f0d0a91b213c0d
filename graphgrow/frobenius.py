"""The import path of the preconditioner before the layout had an engine folder for it; the
code lives in :mod:`graphgrow.precond`."""
from .precond import FrobeniusPreconditioner

__all__ = ["FrobeniusPreconditioner"]
