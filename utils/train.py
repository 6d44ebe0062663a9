"""Device and seed set-up, the one evaluation loop, and one burn-in epoch (SPEC phase 1)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import BatchLoader, Split
from utils.errors import UserError


def get_device(name: str | None = None) -> torch.device:
    """The device: ``name`` if given (checked), else cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(device: torch.device) -> None:
    """Deterministic algorithms only, cuDNN autotuning off; on CUDA also cuBLAS's fixed workspace.

    Ops that have no deterministic kernel warn rather than fail (``warn_only``): on CUDA the backward of
    AdaptiveAvgPool2d, which both archs use, is one, so a CUDA run can still differ in the last bits.
    Call before the first CUDA computation (cuBLAS reads CUBLAS_WORKSPACE_CONFIG once).
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


# On the CPU, evaluate in chunks whose largest activation stays under this many bytes, whatever batch_size asks
# for. Above glibc's mmap threshold (32 MiB at most) such tensors can get fresh pages from the kernel, faulted
# in and zeroed on every pass: in a fresh process the small CNN at batch 1000 spent a third of a full
# evaluation in the kernel (1.8x slower than in chunks), ResNet-18 a fifth. In a process that has already done
# heavy autograd work the penalty may vanish; the chunks then cost nothing either (bench/bench_online.py).
# Eval mode treats every sample on its own, so the logits, hence the error, do not depend on the chunk
# (checked bit-identical for chunks of 7 to 1000, both archs, this CPU).
CPU_EVAL_CHUNK_BYTES = 16 * 2 ** 20
CPU_EVAL_MIN_CHUNK = 16


def _largest_output_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the largest tensor that the input or any submodule's output takes for the batch x."""
    largest = [x.numel() * x.element_size()]

    def hook(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return largest[0]


@torch.inference_mode()
def cpu_eval_chunk(model: nn.Module, x: torch.Tensor, batch_size: int) -> int:
    """The batch size ``evaluate`` uses on the CPU: at most ``batch_size``, activations under CPU_EVAL_CHUNK_BYTES.

    ``x``: one sample (or a few) of the data, for a probing forward pass with the model in eval mode.
    """
    per_sample = _largest_output_bytes(model, x) / len(x)
    return min(batch_size, max(CPU_EVAL_MIN_CHUNK, int(CPU_EVAL_CHUNK_BYTES // per_sample)))


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Test error of the model (eval mode) on a split, in [0, 1]; the model's mode is restored.

    ``batch_size`` only sets the speed; on the CPU it is capped by ``cpu_eval_chunk``.
    """
    was_training = model.training
    model.eval()
    if split.x.device.type == "cpu" and len(split) > 0:
        batch_size = cpu_eval_chunk(model, split.batch(torch.arange(1))[0], batch_size)
    wrong = torch.zeros((), dtype=torch.long, device=split.y.device)  # one device sync, at the end
    for i in range(0, len(split), batch_size):
        x, y = split.batch(torch.arange(i, min(i + batch_size, len(split))))
        wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return wrong.item() / len(split)


def train_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                desc: str = "train", clip_gradnorm: float | None = None) -> tuple[float, float]:
    """One pass of SGD over the loader in train mode; returns (mean loss, train accuracy)."""
    model.train()
    loss_sum = torch.zeros((), device=loader.split.x.device)
    correct = torch.zeros((), device=loader.split.x.device)
    seen = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_gradnorm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_gradnorm)
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    loss_mean = loss_sum.item() / seen
    if not np.isfinite(loss_mean):
        raise UserError(f"the training loss became {loss_mean}; lower --lr or enable --clip_gradnorm")
    return loss_mean, correct.item() / seen
