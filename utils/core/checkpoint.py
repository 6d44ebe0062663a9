"""One checkpoint format: written atomically, read with weights_only=True, carrying its ModelSpec, the run
that wrote it and a content hash of its weights (verified on every load)."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from typing import Any

import torch
import torch.nn as nn

from utils.core.data import DATASETS
from utils.errors import UserError
from utils.core.models import ModelSpec, build_model
from utils.io.results import atomic_write

FORMAT_VERSION = 2  # 2: run_id and net_sha256; 1 (older checkpoints): neither, loaded without the hash check
REQUIRED = {"net": dict, "model": dict, "epoch": int, "err_cls": float}
RECREATE = "re-create it with train_cifar.py"


def weights_digest(net: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(net):
        t = net[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str, model: nn.Module, spec: ModelSpec, *, epoch: int, err_cls: float,
                    args: dict[str, Any], run_id: str | None = None, optimizer: torch.optim.Optimizer | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically: weights and their hash, ModelSpec, epoch, test error, flags, the run id,
    optimizer and RNG state."""
    net = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {"format_version": FORMAT_VERSION, "net": net, "net_sha256": weights_digest(net), "model": spec.to_dict(),
             "epoch": int(epoch), "err_cls": float(err_cls), "run_id": run_id, "args": args,
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "rng": rng}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _check_file(path: str) -> None:
    """A regular, complete zip archive (torch.save's format) at ``path``, else a message saying what is there."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} is a broken symbolic link (to {os.readlink(path)!r}, which does not "
                        f"exist); fix the link or the path")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder, not a file; pass the .pth file inside it")
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        hint = (f"{folder!r} holds: {', '.join(sorted(f for f in os.listdir(folder) if f.endswith('.pth')))}"
                if os.path.isdir(folder) else f"the folder {folder!r} does not exist")
        raise UserError(f"checkpoint {path!r} not found ({hint}); run train_cifar.py first or fix the path")
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # torch.save's archive, or its legacy pickle format
        return
    if not head or head.startswith(b"PK"):
        raise UserError(f"checkpoint {path!r} is corrupt or truncated ({os.path.getsize(path)} bytes, not a complete "
                        f"torch.save archive); {RECREATE}")
    raise UserError(f"{path!r} is not a checkpoint: it holds no torch.save archive (it starts with {head!r}, "
                    f"perhaps a text file); pass a .pth file written by train_cifar.py")


def _unpickle(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's text advises weights_only=False: not repeated
        detail = (f"it names {named.group(1)}" if named else
                  next((line for line in lines if "Unsupported" in line), lines[0] if lines else ""))
        raise UserError(f"checkpoint {path!r} holds objects that are not plain data and was refused ({detail}; "
                        f"read with weights_only=True, so none of it ran). Only load checkpoints you trust, "
                        f"written by train_cifar.py") from e
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {first}); "
                        f"{RECREATE}") from e


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True and verify its weights' hash; anything else is a UserError."""
    _check_file(path)
    ckpt = _unpickle(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("net"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path!r} is not a checkpoint of this project (no 'net'/'model' entries); "
                        f"train one with train_cifar.py")
    for key, kind in REQUIRED.items():
        if not isinstance(ckpt.get(key), (int, float) if kind is float else kind) or isinstance(ckpt.get(key), bool):
            raise UserError(f"checkpoint {path!r} has no valid {key!r} entry ({'its test error' if key == 'err_cls' else key}"
                            f" is {ckpt.get(key)!r}): it was not written by this project's train_cifar.py; {RECREATE}")
    stored = ckpt.get("net_sha256")
    if ckpt.get("format_version", 1) >= 2 and stored != weights_digest(ckpt["net"]):
        raise UserError(f"checkpoint {path!r} is corrupt: its weights do not match the content hash stored in it "
                        f"({'no hash stored' if stored is None else 'a changed byte'}); {RECREATE}")
    return ckpt


def _shape_mismatch(model: nn.Module, net: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and a checkpoint's: missing/unexpected names, shapes."""
    own = model.state_dict()
    missing, extra = [k for k in own if k not in net], [k for k in net if k not in own]
    shapes = [f"{k} is {tuple(net[k].shape)} in the file but {tuple(own[k].shape)} in the model"
              for k in own if k in net and tuple(net[k].shape) != tuple(own[k].shape)]
    parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
            ([f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"] if extra else []) + shapes[:2]
    return "; ".join(parts) or "the entries differ"


def model_from_checkpoint(ckpt: dict[str, Any], path: str = "checkpoint") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model a checkpoint describes and load its weights; inconsistent or non-finite ones are refused."""
    try:
        spec = ModelSpec.from_dict(ckpt["model"])
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{path!r} has a malformed model description ({e}); {RECREATE}") from e
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
        raise UserError(f"the weights in {path!r} do not fit the {spec.arch} (width {spec.width or 'default'}) its "
                        f"model description names: {_shape_mismatch(model, ckpt['net'])}; {RECREATE}") from e
    return model, spec


def check_spec(spec: ModelSpec, path: str, **expected: Any) -> None:
    """Fail clearly when a checkpoint's ModelSpec differs from what the flags ask for (None = no request)."""
    for key, want in expected.items():
        have = getattr(spec, key)
        if want is not None and have != want:
            raise UserError(f"{path!r} holds a model with {key}={have!r}, but {key}={want!r} was asked for; "
                            f"pass the matching flag or use a checkpoint trained for it")


def load_memorized_model(path: str, spec: ModelSpec, run_id: str | None,
                         allow_other_run: bool) -> tuple[nn.Module, int]:
    """A memorized (earlier) model of the same burn-in run (``run_id``) as the online model of ``spec``, in eval
    mode, and its epoch (SPEC "Memorization Discrepancy")."""
    ckpt = load_checkpoint(path)
    memorized, mspec = model_from_checkpoint(ckpt, path)
    for key in ("arch", "dataset", "num_classes", "in_channels", "norm", "width"):
        if getattr(mspec, key) != getattr(spec, key):
            raise UserError(f"the memorized model {path!r} has {key}={getattr(mspec, key)!r} but the online model "
                            f"has {key}={getattr(spec, key)!r}; pass --memorized_model from the same burn-in run")
    if ckpt.get("run_id") != run_id and not allow_other_run:
        raise UserError(f"the memorized model {path!r} was written by another burn-in run (run id "
                        f"{ckpt.get('run_id')}) than the online model (run id {run_id}); pass --memorized_model "
                        f"from the same run, or --allow_other_run to compare models of different runs on purpose")
    return memorized.eval(), ckpt["epoch"]
