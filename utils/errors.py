"""One error type for bad user input, and the wrapper that turns it, interruptions and machine faults into one
clear line (a traceback only with --debug)."""
from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Callable, Sequence


class UserError(ValueError):
    """A problem with what the user asked for; the message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the script says what was kept and exits 143."""


def _exit_at_once(signum: int, _frame: object) -> None:
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    print(f"interrupted: {name} while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def quiet_start() -> None:
    """Until ``run_cli`` takes over: Ctrl-C or SIGTERM (e.g. while torch is being imported) ends the process
    with one line instead of a traceback. Call it first in a script, before the heavy imports."""
    signal.signal(signal.SIGINT, _exit_at_once)
    signal.signal(signal.SIGTERM, _exit_at_once)


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated()


def disk_full_message(path: str | None, why: str | None) -> str:
    """The one wording of a full disk (or quota), in every script and writer."""
    what = f"could not write {path!r}" if path else "could not write a file"
    return (f"{what}: {why or 'No space left on device'}; free some space (or choose another --out/--outf) and run "
            f"the same command again (what was finished is kept, nothing half-written)")


def _fault_message(e: BaseException) -> str | None:
    """One line for a machine fault (full disk, GPU out of memory); None for anything else."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_message(os.fsdecode(e.filename) if e.filename else None, e.strerror)
    if type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e):
        first = str(e).splitlines()[0] if str(e) else ""
        return (f"the GPU ran out of memory ({first[:160]}); use a smaller --batch_size / --eval_batch_size or "
                f"--test_batch_size, a smaller model, or --device cpu")
    return None


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``: a UserError or a machine fault prints one ``error:`` line and exits 1; Ctrl-C
    (130) and SIGTERM (143) one ``interrupted:`` line (a script re-raises them saying what was kept)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; a script may re-raise it saying what was kept
        if debug:
            raise
        what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"interrupted ({what}): {e or 'results that were complete are kept'}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except (OSError, RuntimeError) as e:
        message = _fault_message(e)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
