"""The one results writer: atomic files, whole JSON lines, and an exclusive lock on a results folder.

Nothing here imports torch: drivers and reports read and write results without loading models.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import tempfile
from typing import Any, Callable

from utils.errors import UserError

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _disk_error(path: str, e: OSError) -> UserError:
    """A full disk or quota: one clear message (nothing half-written was kept)."""
    return UserError(f"could not write {path!r}: {e.strerror}; free some space (or choose another --out/--outf) "
                     f"and run the command again")


def check_run_files(log_name: str, reserved: tuple[str, ...], required: dict[str, str]) -> None:
    """A run's --log_name is a plain file name other than the run's own result files (``reserved``); each required
    path (flag -> value) is given."""
    if not log_name or os.path.basename(log_name) != log_name or log_name in reserved:
        raise UserError(f"--log_name must be a plain file name other than {', '.join(reserved)}, got {log_name!r}")
    for flag, value in required.items():
        if not value:
            raise UserError(f"{flag} must not be empty")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename onto ``path``: readers never see a half-written
    file, even after Ctrl-C, a crash or a full disk (the temporary file is removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_error(path, e) from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temps(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files an interrupted (killed) writer left in ``folder``; call it under the lock."""
    stale = glob.glob(os.path.join(glob.escape(folder), TEMP_PREFIX + "*"))
    for path in stale:
        _remove_quietly(path)
    return stale


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(_plain(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, objs: list[Any]) -> None:
    """Replace a JSON-lines file with these lines, atomically."""
    write_text(path, "".join(json.dumps(_plain(obj)) + "\n" for obj in objs))


def append_jsonl(path: str, obj: Any) -> None:
    """Append one JSON line and flush it to disk; a line that cannot be written whole is cut off again, so
    the file only ever holds whole lines (a full disk, Ctrl-C)."""
    data = (json.dumps(_plain(obj)) + "\n").encode()
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as e:
            f.truncate(start)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_error(path, e) from e
            raise


def read_jsonl(path: str) -> list[dict]:
    """All lines of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
    """One JSON file (a clear error when it is not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path!r} is not valid JSON ({e}); delete it and run the command again") from e


def ensure_dir(path: str, flag: str = "--out") -> str:
    """Create a results folder, or fail clearly when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, TEMP_PREFIX + "write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the folder {path!r} ({e.strerror}); choose another with {flag}") from e
    return path


class FolderLock:
    """An exclusive lock on a results folder for a run's lifetime (``flock`` on ``<folder>/.lock``).

    The kernel drops the lock when the process ends, however it ends; a second process that asks for it
    is refused with a message naming the holder's pid.
    """

    def __init__(self, folder: str, flag: str = "--out"):
        self.folder, self.flag, self.fd = folder, flag, None

    def __enter__(self) -> "FolderLock":
        path = os.path.join(self.folder, LOCK_NAME)
        while self.fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"another process (pid {holder}) is writing to {self.folder!r}; wait for it to "
                                f"finish or choose another {self.flag}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
        remove_stale_temps(self.folder)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            _remove_quietly(os.path.join(self.folder, LOCK_NAME))
            os.close(self.fd)
            self.fd = None


def refuse_existing(out: str | None, files: tuple[str, ...], overwrite: bool, remove: bool = False) -> None:
    """A finished run's results (summary.json, one of ``files``) in ``out`` are refused unless --overwrite; an
    unfinished run's files are replaced. ``remove`` (under the lock): delete what the new run replaces."""
    present = [f for f in files if out is not None and os.path.exists(os.path.join(out, f))]
    if "summary.json" in present and not overwrite:
        raise UserError(f"{out!r} already holds results; pass --overwrite or choose another --out")
    if present and remove and "summary.json" not in present:
        print(f"note: replacing the unfinished run in {out!r} (it has no summary.json)")
    for f in present if remove else []:
        os.remove(os.path.join(out, f))


def run_in_folder(out: str, files: tuple[str, ...], overwrite: bool, config: dict, body: Callable[[], dict],
                  line: Callable[[dict], str], log_name: str, progress: str) -> dict:
    """The one way a run writes its results folder (online and federated runs): under the folder's lock, refuse or
    replace earlier results, write config.json, run ``body`` (which appends to ``progress`` as it goes), append the
    log line to ``log_name``, write summary.json; on Ctrl-C or SIGTERM say what was kept. Returns the summary."""
    with FolderLock(ensure_dir(out)):  # only once the flags, checkpoints and data are known to be good
        refuse_existing(out, files, overwrite, remove=True)
        write_json(os.path.join(out, "config.json"), config)
        try:
            summary = body()
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (utils.errors.Terminated): the same type
            raise type(e)(f"the finished {os.path.splitext(progress)[0]} are kept in {os.path.join(out, progress)!r}, "
                          f"no summary.json was written; the same command runs it again") from None
        text = line(summary)
        with open(os.path.join(out, log_name), "a") as f:
            f.write(text + "\n")
        write_json(os.path.join(out, "summary.json"), summary)
    print(text)
    return summary
