"""The one results writer: atomic files, whole JSON lines, and an exclusive lock on a results folder.

Nothing here imports torch: drivers and reports read and write results without loading models.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from utils.errors import UserError, disk_full_message

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


def _disk_error(path: str, e: BaseException) -> UserError:
    """A full disk or quota: one clear message (nothing half-written was kept)."""
    return UserError(disk_full_message(path, e.strerror if isinstance(e, OSError) else None))


def check_run_files(log_name: str, reserved: tuple[str, ...], required: dict[str, str]) -> None:
    """A run's --log_name is a plain file name other than the run's own result files (``reserved``); each required
    path (flag -> value) is given."""
    if not log_name or os.path.basename(log_name) != log_name or log_name in reserved:
        raise UserError(f"--log_name must be a plain file name other than {', '.join(reserved)}, got {log_name!r}")
    for flag, value in required.items():
        if not value:
            raise UserError(f"{flag} must not be empty")


@contextlib.contextmanager
def _whole_or_removed(dest: str, tmp: str, remove: Callable[[str], None], folder: str) -> Iterator[None]:
    """Around writing ``tmp`` and renaming it onto ``dest``: on any failure ``tmp`` is removed; a full disk is one
    clear error naming ``dest``, also when the library reports it without an errno (torch.save's 'unexpected pos
    ...', shutil.Error's gathered text): the file system is then asked, before ``tmp`` goes, for one more block."""
    try:
        yield
    except Exception as e:
        full = _is_disk_full(e) or (getattr(e, "errno", None) is None and _no_space_left(folder))
        remove(tmp)
        if full:
            raise _disk_error(dest, e) from e
        raise
    except BaseException:
        remove(tmp)
        raise


def _usual_permissions(path: str, bits: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give ``path`` what the umask gives a new file or folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, bits & ~umask)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename onto ``path``: readers never see a half-written
    file, even after Ctrl-C, a crash or a full disk (the temporary file is removed). A full disk is one clear
    error naming ``path``, also when the library writing the file reports it as something else (torch.save)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    with _whole_or_removed(path, tmp, _remove_quietly, folder):
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _usual_permissions(tmp, 0o666)
        os.replace(tmp, path)


def copy_folder(source: str, dest: str, edit: Callable[[str], None] | None = None) -> None:
    """Copy a folder whole or not at all: into a temporary sibling, ``edit(tmp)`` it, then rename it onto ``dest``
    (a full disk: one clear error, no partial copy left)."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, suffix=os.path.basename(dest), dir=parent)
    with _whole_or_removed(dest, tmp, lambda t: shutil.rmtree(t, ignore_errors=True), parent):
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if edit is not None:
            edit(tmp)
        _usual_permissions(tmp, 0o777)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


def _is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _no_space_left(folder: str, probe_bytes: int = 4096) -> bool:
    """Whether ``folder``'s file system refuses another ``probe_bytes`` (asked after a library failed to write,
    before its partial file is removed: torch.save reports a full disk as 'unexpected pos ...')."""
    try:
        with tempfile.TemporaryFile(prefix=TEMP_PREFIX, dir=folder) as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return _is_disk_full(e)
    return False


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temps(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files (and folders) an interrupted (killed) writer left in ``folder``; call it under the
    lock."""
    stale = glob.glob(os.path.join(glob.escape(folder), TEMP_PREFIX + "*"))
    for path in stale:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)  # a folder copy (copy_folder) that was killed
        else:
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


def append_bytes(path: str, data: bytes) -> None:
    """Append ``data`` through one unbuffered descriptor and flush it to disk; what cannot be written whole (a full
    disk, Ctrl-C, any error) is cut off again, so the file ends where it ended before."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        if _is_disk_full(e):
            raise _disk_error(path, e) from e
        raise
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:
            os.ftruncate(fd, start)
            if _is_disk_full(e):
                raise _disk_error(path, e) from e
            raise
    finally:
        os.close(fd)


def append_jsonl(path: str, obj: Any) -> None:
    """Append one JSON line and flush it to disk; the file only ever holds whole lines (a full disk, Ctrl-C)."""
    append_bytes(path, (json.dumps(_plain(obj)) + "\n").encode())


def append_line(path: str, text: str) -> None:
    """Append one line of text to a log file, whole or not at all."""
    append_bytes(path, (text + "\n").encode())


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
            self.fd = fd
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:
                self.__exit__()
                if _is_disk_full(e):
                    raise _disk_error(path, e) from e
                raise
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
        append_line(os.path.join(out, log_name), text)
        write_json(os.path.join(out, "summary.json"), summary)
    print(text)
    return summary
