"""The online phase (SPEC "Phase 2", "The attack"): accumulative poisoning of a learner, then the trigger.

The authors' command lines run unchanged, e.g. (run_st.sh):
  python online_accu_train.py --batch_size 100 --epoch 100 --test_batch_size 500 --resume checkpoints_base_bn \
      --use_bn --model_name epoch40.pth --mode eval --onlinemode train --lr 1e-1 --momentum 0.9 --beta 1. \
      --only_reg --threshold 0.18 --use_advtrigger --med ST
Results: <--out>/config.json, steps.jsonl (one line per arriving batch), md.jsonl, summary.json, the log line.
This script is the flags (``utils.online.flags``, generated from the configuration's fields); the run is
``utils.online.run.run_online(config)``.
"""
from __future__ import annotations

from utils.errors import quiet_start

if __name__ == "__main__":
    quiet_start()  # before torch is imported: Ctrl-C or SIGTERM while starting prints one line

from typing import Sequence

from utils.errors import run_cli
from utils.online.flags import build_parser, parse_config
from utils.online.run import run_online

__all__ = ["build_parser", "parse_config", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    run_online(parse_config(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
