"""How the console scripts report errors: a user's mistake is one line and exit code 2, a bug a traceback.

    from drift.cli import UserError, run_main

    def _main(argv):            # the script's real work; raises UserError (or ValueError) on bad input
        ...
    def main(argv=None) -> int:
        return run_main(_main, argv, prog="drift-sample")

`run_main` strips a `--debug` flag from argv; with it, user errors are re-raised with their traceback.
Errors counted as the user's: `UserError`, `ValueError` (and its subclasses `CheckpointError`,
`WeightsError`), `FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`, `PermissionError`.
Everything else is a bug and keeps its traceback. Imports only the standard library.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """A problem with what the user asked for (a flag, a file, a configuration), not a bug."""


def run_main(fn: Callable[[List[str]], int], argv: Optional[Sequence[str]], prog: str,
             user_errors: Tuple[type, ...] = ()) -> int:
    """Call fn(argv) and turn a user error into `prog: error: <message>` on stderr and exit code 2.

    `user_errors` adds exception types a script counts as the user's too (drift-prep: any OSError, since its
    inputs and outputs are the user's files and disks)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        return int(fn(args) or 0)
    except (UserError,) + USER_ERRORS + tuple(user_errors) as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
