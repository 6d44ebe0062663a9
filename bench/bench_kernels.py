"""What pinning the CPU kernels costs (docs/REPRODUCIBILITY.md): one burn-in epoch of the cpu preset's CNN on real
Fashion-MNIST and one accumulative crafting (ε 0.05, K 2, batch 100, validation 500), each setting in a fresh
process (the kernel variables are read once per process), 2 threads; medians of ``--repeats`` craftings.

  .venv/bin/python bench/bench_kernels.py            # about 3 minutes on 2 quiet cores

Settings: the native kernels; the portable ones (utils.core.train.PORTABLE_KERNELS: ATen, oneDNN and MKL at AVX2);
portable without oneDNN (convolutions through ATen and MKL); every library at its most portable level (no vector
ISA); float64 with the native kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from utils.core.train import PORTABLE_KERNELS

SETTINGS = {
    "native": {},
    "portable (AVX2)": dict(PORTABLE_KERNELS),
    "portable, no oneDNN": {**PORTABLE_KERNELS, "NO_ONEDNN": "1"},
    "no vector ISA (ATen default, oneDNN SSE4.1, MKL compatible)": {"ATEN_CPU_CAPABILITY": "default",
                                                                   "ONEDNN_MAX_CPU_ISA": "SSE41",
                                                                   "MKL_CBWR": "COMPATIBLE"},
    "float64, native": {"FLOAT64": "1"},
}


class CastBatches:
    """A loader's batches with the images cast to ``dtype`` (float64 runs)."""

    def __init__(self, loader, dtype) -> None:
        self.loader, self.dtype, self.split = loader, dtype, loader.split

    def __iter__(self):
        return ((x.to(self.dtype), y) for x, y in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def measure(repeats: int) -> dict:
    """In this process: one burn-in epoch and ``repeats`` craftings, in seconds."""
    import torch

    from utils.attack.craft import craft_accumulative_poison
    from utils.core.data import get_data, train_loader
    from utils.core.models import build_model, model_spec
    from utils.core.train import set_seed, set_threads, train_epoch

    set_threads(2)
    torch.backends.mkldnn.enabled = not os.environ.get("NO_ONEDNN")
    dtype = torch.float64 if os.environ.get("FLOAT64") else torch.float32
    data = get_data("fashion-mnist", "data", "cpu", download=False)
    set_seed(0)
    model = build_model(model_spec("cnn", data.info)).to(dtype)
    loader = CastBatches(train_loader(data, 256, torch.Generator().manual_seed(0)), dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    t0 = time.perf_counter()
    train_epoch(model, loader, opt, desc="epoch")
    epoch_s = time.perf_counter() - t0
    (x, y), (xt, yt), (xv, yv) = (data.train.batch(torch.arange(100, 200)), data.train.batch(torch.arange(100)),
                                  data.test.batch(torch.arange(500)))
    model.eval()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        craft_accumulative_poison(model, x.to(dtype), y, xt.to(dtype), yt, xv.to(dtype), yv, epsilon=0.05)
        times.append(time.perf_counter() - t0)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "epoch_s": epoch_s,
            "craft_s": statistics.median(times[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.repeats)))
        return 0
    print(f"load average at start: {os.getloadavg()[0]:.2f} (time on a quiet machine)")
    base = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    rows = {}
    for name, env in SETTINGS.items():
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats)],
                              env={**base, **env}, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    ref = rows["native"]
    print(f"{'setting':62s} {'ATen':>8s} {'epoch s':>8s} {'x':>5s} {'craft s':>8s} {'x':>5s}")
    for name, r in rows.items():
        print(f"{name:62s} {r['capability']:>8s} {r['epoch_s']:8.2f} {r['epoch_s'] / ref['epoch_s']:5.2f} "
              f"{r['craft_s']:8.3f} {r['craft_s'] / ref['craft_s']:5.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
