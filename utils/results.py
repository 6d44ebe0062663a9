"""The one results writer: atomic JSON files and append-only JSON lines."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from utils.checkpoint import atomic_write
from utils.errors import UserError


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def ensure_dir(path: str) -> str:
    """Create a results folder, or fail clearly when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the folder {path!r} ({e.strerror}); choose another with --out/--outf") from e
    return path


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _write_text(path, json.dumps(_plain(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, objs: list[Any]) -> None:
    """Replace a JSON-lines file with these lines, atomically."""
    _write_text(path, "".join(json.dumps(_plain(obj)) + "\n" for obj in objs))


def append_jsonl(path: str, obj: Any) -> None:
    """Append one JSON line and flush it to disk, so an interrupted run keeps every finished line."""
    with open(path, "a") as f:
        f.write(json.dumps(_plain(obj)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    """All lines of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
