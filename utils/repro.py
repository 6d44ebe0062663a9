"""--deterministic: ask torch for deterministic kernels (same seed, same machine, same numbers)."""
from __future__ import annotations

import os

import torch


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
