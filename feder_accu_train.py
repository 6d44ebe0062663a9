"""Federated learning under the accumulative attack (SPEC "Federated learning"): N clients, one malicious (or a
fraction, --malicious), accumulative rounds then the trigger round, with the server's --aggregator (fedavg, clip,
median, trimmed_mean, krum, multikrum, fltrust, md_screen); in this process (default) or on Flower (--flower).

The authors' experiment (their feder_accu_train.py: the attacker's updates alone, no honest clients):
  python feder_accu_train.py --attacker_only --resume checkpoints_base_bn --model_name epoch40.pth --lr 0.1 \
      --momentum 0.9 --feder_lambda 0.01 --epochs 100
Results: <--out>/config.json, rounds.jsonl (one line per round: test error, alignment, every update's scores, the
aggregator's weights, timings), summary.json (errors before/after the trigger round, per-score AUROCs, costs).
This script is the flags (``utils.fed.flags``); the run is ``utils.fed.run.run_federated(config)``.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

from typing import Sequence

from utils.errors import run_cli
from utils.fed.flags import build_parser, parse_config
from utils.fed.run import run_federated

__all__ = ["build_parser", "parse_config", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    run_federated(parse_config(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
