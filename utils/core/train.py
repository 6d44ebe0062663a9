"""Device and seed set-up, the one evaluation loop, one burn-in epoch (SPEC "Phase 1"), and the online learner
(SPEC "Phase 2"): its settings, its model and optimizer, its plain SGD step."""
from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.core.checkpoint import weights_digest
from utils.core.data import BatchLoader, Split
from utils.core.distributed import Dist, all_sum, shard
from utils.core.models import memory_format
from utils.errors import UserError
from utils.fields import check_fields, opt


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


def git_commit() -> dict:
    """The code's git commit and whether the checkout has uncommitted changes (None outside a checkout)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # utils/<pkg>/<file>

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def environment(device: torch.device) -> dict:
    """Code version, library versions, machine and the settings that decide bitwise reproducibility."""
    import torchvision  # imported here: it is slow to import, and loading the data has imported it already

    return {**git_commit(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cpu_kernels": cpu_kernels(), "memory_format": memory_format()}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The kernels a "portable" CPU run pins (docs/REPRODUCIBILITY.md): ATen's vector kernels, oneDNN's convolutions and
# MKL's matrix products, all at the AVX2 level (MKL in its conditional-numerical-reproducibility mode), so that every
# x86-64 CPU with AVX2 runs the same code; together with a pinned thread count, the same floats. Each library reads
# its variable once, at its first use in the process.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "AVX2,STRICT"}
KERNELS = ("native", "portable")
KERNELS_HELP = ("CPU kernels: native (each library's fastest for this CPU; the numbers depend on the CPU) or portable "
                "(ATen, oneDNN and MKL pinned at AVX2: meant to give the same floats on every x86-64 CPU with AVX2 at "
                "the same --threads, tested by imitation; docs/REPRODUCIBILITY.md)")


def cpu_kernels() -> dict:
    """What decides the CPU kernels of this process: ATen's capability and the libraries' variables."""
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k) for k in PORTABLE_KERNELS}}


def use_cpu_kernels(kernels: str) -> None:
    """'portable': pin the CPU kernels to PORTABLE_KERNELS (before this process's first computation); 'native':
    leave each library's choice for this CPU (the numbers then depend on the CPU's vector instructions)."""
    if kernels != "portable":
        return
    for key, value in PORTABLE_KERNELS.items():
        if os.environ.get(key, value) != value:
            print(f"note: --cpu_kernels portable sets {key}={value} (the environment asked for {os.environ[key]})")
    os.environ.update(PORTABLE_KERNELS)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise UserError(f"--cpu_kernels portable pins the CPU kernels at AVX2, but this process runs ATen's "
                        f"{capability} kernels: either this CPU has no AVX2 (then use --cpu_kernels native, and "
                        f"expect numbers that differ from the published ones), or the kernels were chosen by an "
                        f"earlier computation in this process (then start a new one, or export "
                        f"{' '.join(f'{k}={v}' for k, v in PORTABLE_KERNELS.items())} before Python starts)")


SEED_MAX = 2 ** 32 - 1  # the largest seed NumPy accepts


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """torch's intra-op CPU threads (0: leave torch's default, the machine's cores). CPU results depend on it:
    the threads split the floating-point sums, and the online phase amplifies a last-bit difference."""
    if threads:
        torch.set_num_threads(threads)


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
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what a model computes with: its structure, every parameter's and buffer's strides (the memory
    layout), and their names, dtypes, shapes and bytes (``weights_digest``), non-persistent buffers included."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layout = "|".join(f"{name}{tuple(t.stride())}" for name, t in tensors.items())
    return hashlib.sha256(f"{model!r}|{layout}|{weights_digest(tensors)}".encode()).hexdigest()


def evaluate_remembered(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """``evaluate``, remembered on the split per exact model, batch size, threads and CPU kernels: the runs of one
    burn-in all start from its weights, and a run whose phase changed nothing ends at them (SPEC "Phase 2")."""
    key = (model_fingerprint(model), batch_size, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key not in split.errors:
        split.errors[key] = evaluate(model, split, batch_size)
    return split.errors[key]


def cpu_eval_chunk(model: nn.Module, x: torch.Tensor, batch_size: int) -> int:
    """The batch size ``evaluate`` uses on the CPU: at most ``batch_size``, activations under CPU_EVAL_CHUNK_BYTES.

    ``x``: one sample (or a few) of the data, for a probing forward pass with the model in eval mode.
    """
    per_sample = _largest_output_bytes(model, x) / len(x)
    return min(batch_size, max(CPU_EVAL_MIN_CHUNK, int(CPU_EVAL_CHUNK_BYTES // per_sample)))


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, dist: Dist | None = None) -> float:
    """Test error of the model (eval mode) on a split, in [0, 1]; the model's mode is restored.

    ``batch_size`` only sets the speed; on the CPU it is capped by ``cpu_eval_chunk``. Under torchrun (``dist``)
    each rank counts its shard of the split and the counts are summed.
    """
    was_training = model.training
    model.eval()
    if split.x.device.type == "cpu" and len(split) > 0:
        batch_size = cpu_eval_chunk(model, split.batch(torch.arange(1))[0], batch_size)
    indices = torch.arange(len(split))
    if dist is not None and dist.on:
        indices = indices.tensor_split(dist.world)[dist.rank]
    wrong = torch.zeros((), dtype=torch.long, device=split.y.device)  # one device sync, at the end
    for chunk in indices.split(batch_size):
        x, y = split.batch(chunk)
        wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return all_sum(wrong, dist or Dist()).item() / len(split)


def _batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of this rank's shard, the loss whose DDP-averaged gradient is that of the global batch's mean CE)."""
    if not dist.on:
        logits = model(x)
        return logits, F.cross_entropy(logits, y)
    xs, ys = shard(x, y, dist)
    logits = model(xs)
    return logits, F.cross_entropy(logits, ys, reduction="sum") * dist.world / len(y)


def train_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer, desc: str = "train",
                clip_gradnorm: float | None = None, dist: Dist | None = None) -> tuple[float, float]:
    """One pass of SGD over the loader in train mode; returns (mean loss, train accuracy). Under torchrun every
    rank takes its shard of each global batch (a last batch smaller than the number of ranks is skipped)."""
    dist = dist or Dist()
    model.train()
    loss_sum = torch.zeros((), device=loader.split.x.device)
    correct = torch.zeros((), device=loader.split.x.device)
    seen = 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.main else True):
        if len(y) < dist.world:
            continue
        logits, loss = _batch_loss(model, x, y, dist)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_gradnorm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_gradnorm)
        optimizer.step()
        ys = shard(x, y, dist)[1]
        loss_sum += loss.detach() * len(y) / dist.world
        correct += (logits.detach().argmax(1) == ys).sum()
        seen += len(y)
    loss_mean = all_sum(loss_sum, dist).item() / seen
    if not np.isfinite(loss_mean):
        raise UserError(f"the training loss became {loss_mean}; lower --lr or enable --clip_gradnorm")
    return loss_mean, all_sum(correct, dist).item() / seen


@dataclass(frozen=True)
class LearnerConfig:
    """The online learner's SGD (SPEC "Phase 2")."""

    lr: float = opt(0.01, "online SGD learning rate", low=0, low_open=True)
    momentum: float = opt(0.0, "online SGD momentum", low=0, high=1)
    weight_decay: float = opt(0.0, "online SGD weight decay", low=0, high=1)
    mode: str = opt("train", "model mode while learning", flag="--onlinemode", choices=("eval", "train"),
                    parse_choices=True)
    clip_gradnorm: bool = opt(False, "clip each online gradient's inf-norm to --clipvalue (as the authors)")
    clipvalue: float = opt(0.01, "the inf-norm --clip_gradnorm clips to", low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def clip_value(self) -> float | None:
        return self.clipvalue if self.clip_gradnorm else None


@dataclass
class Learner:
    """The online learner: its model, optimizer and how it steps (SPEC "Phase 2")."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    mode: str = "train"  # the model's mode during its update (--onlinemode)
    clip_value: float | None = None  # the authors' --clip_gradnorm: clip the gradient's inf-norm to this


def sgd_step(learner: Learner, x: torch.Tensor, y: torch.Tensor, niter: int = 1) -> None:
    """``niter`` plain SGD steps on (x, y) with the model in the learner's mode (SPEC "Phase 2")."""
    model = learner.model
    model.train(learner.mode == "train")
    for _ in range(niter):
        learner.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if learner.clip_value is not None:
            nn.utils.clip_grad_norm_(model.parameters(), learner.clip_value, norm_type=float("inf"))
        learner.optimizer.step()
