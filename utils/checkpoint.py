"""One checkpoint format: written atomically, read with weights_only=True, carrying its ModelSpec."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.models import ModelSpec, build_model

FORMAT_VERSION = 1


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, model: nn.Module, spec: ModelSpec, *, epoch: int, err_cls: float,
                    args: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically: state dict, ModelSpec, epoch, test error, flags, optimizer and RNG state."""
    state = {
        "format_version": FORMAT_VERSION,
        "net": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": spec.to_dict(),
        "epoch": int(epoch),
        "err_cls": float(err_cls),
        "args": args,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; missing, corrupt or foreign files are a UserError."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        hint = (f"{folder!r} holds: {', '.join(sorted(f for f in os.listdir(folder) if f.endswith('.pth')))}"
                if os.path.isdir(folder) else f"the folder {folder!r} does not exist")
        raise UserError(f"checkpoint {path!r} not found ({hint}); run train_cifar.py first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if "Unsupported global" in line or "Unsupported operand" in line),
                      lines[0] if lines else "")
        raise UserError(f"checkpoint {path!r} holds objects that are not plain data and was refused "
                        f"(loaded with weights_only=True; {detail}). Only load checkpoints you trust, "
                        f"written by train_cifar.py") from e
    except Exception as e:
        raise UserError(f"checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"re-create it with train_cifar.py") from e
    if not isinstance(ckpt, dict) or "net" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path!r} is not a checkpoint of this project (no 'net'/'model' entries); "
                        f"train one with train_cifar.py")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str = "checkpoint") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model a checkpoint describes and load its weights."""
    spec = ModelSpec.from_dict(ckpt["model"])
    model = build_model(spec)
    try:
        model.load_state_dict(ckpt["net"])
    except RuntimeError as e:
        raise UserError(f"the weights in {path!r} do not fit a {spec.arch} model: {str(e).splitlines()[0]}") from e
    return model, spec


def check_spec(spec: ModelSpec, path: str, **expected: Any) -> None:
    """Fail clearly when a checkpoint's ModelSpec differs from what the flags ask for (None = no request)."""
    for key, want in expected.items():
        have = getattr(spec, key)
        if want is not None and have != want:
            raise UserError(f"{path!r} holds a model with {key}={have!r}, but {key}={want!r} was asked for; "
                            f"pass the matching flag or use a checkpoint trained for it")
