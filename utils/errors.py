"""One error type for bad user input, and the wrapper that turns it into a clear message."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(ValueError):
    """A problem with what the user asked for; the message says what to do."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``: a UserError prints one message and exits 1, Ctrl-C one line and exits 130
    (tracebacks only with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C; a script may re-raise it with a message saying what was kept
        if debug:
            raise
        print(f"interrupted: {e or 'results that were complete are kept'}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
