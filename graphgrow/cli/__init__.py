"""The `graphgrow` command line. User mistakes print one line `path:line:col: error: ...`
and exit with status 2; no traceback."""
from __future__ import annotations

import sys

from ..errors import GraphgrowError
from ..runtime.interrupts import RunInterrupted
from ..runtime.distributed import ReportedByRankZero
from .commands import rank_zero
from .parser import build_parser


#: Python API argument names whose command-line option is spelt differently, per command
_OPTION_NAMES = {"mgopt": {"alpha": "lr"}}


def cli_message(err: GraphgrowError, command: str) -> str:
    """The error's one line, with the Python argument it names shown as the command's option
    (``insert_at`` -> ``--insert-at``) and 'graphgrow' where nothing more precise is known."""
    if err.option and not err.option.startswith("-"):
        err.option = "--" + _OPTION_NAMES.get(command, {}).get(err.option, err.option).replace("_", "-")
    if err.file is None and err.option is None:
        err.option = f"graphgrow {command}"
    return err.format()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser().parse_args(argv)
    opts.argv = argv
    opts.command_argv = argv[argv.index(opts.command) + 1:]
    try:
        code = opts.run(opts)
    except GraphgrowError as err:
        if not isinstance(err, ReportedByRankZero):  # rank 0 prints that one
            print(cli_message(err, opts.command), file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        if rank_zero():  # every rank stops; the resume command is printed once
            print(stop, file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0

