"""One checkpoint format: written atomically, read with weights_only=True, carrying its ModelSpec."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any

import torch
import torch.nn as nn

from utils.data import DATASETS
from utils.errors import UserError
from utils.models import ModelSpec, build_model

FORMAT_VERSION = 1


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename onto ``path``: readers never see a half-written
    file, even after Ctrl-C or a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
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
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's text advises weights_only=False: not repeated
        detail = (f"it names {named.group(1)}" if named else
                  next((line for line in lines if "Unsupported" in line), lines[0] if lines else ""))
        raise UserError(f"checkpoint {path!r} holds objects that are not plain data and was refused ({detail}; "
                        f"read with weights_only=True, so none of it ran). Only load checkpoints you trust, "
                        f"written by train_cifar.py") from e
    except Exception as e:
        raise UserError(f"checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"re-create it with train_cifar.py") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("net"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path!r} is not a checkpoint of this project (no 'net'/'model' entries); "
                        f"train one with train_cifar.py")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str = "checkpoint") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model a checkpoint describes and load its weights; inconsistent or non-finite ones are refused."""
    try:
        spec = ModelSpec.from_dict(ckpt["model"])
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{path!r} has a malformed model description ({e}); re-create it with train_cifar.py") from e
    info = DATASETS.get(spec.dataset)
    if info is None:
        raise UserError(f"{path!r} holds a model for an unknown dataset {spec.dataset!r}; known datasets: "
                        f"{', '.join(DATASETS)}")
    if (spec.num_classes, spec.in_channels) != (info.num_classes, info.in_channels):
        raise UserError(f"{path!r} holds a model with {spec.num_classes} classes and {spec.in_channels} input "
                        f"channels, but {spec.dataset} has {info.num_classes} classes and {info.in_channels} "
                        f"channels; use a checkpoint that train_cifar.py wrote for {spec.dataset}")
    bad = [k for k, v in ckpt["net"].items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise UserError(f"the weights in {path!r} contain NaN/inf (in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the run that wrote it diverged; "
                        f"use an earlier checkpoint or train again with a lower --lr")
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
