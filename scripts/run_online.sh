#!/usr/bin/env bash
# Shared body of run_st.sh / run_at.sh / run_dsc.sh: the authors' command for one defence ($1), with
# environment overrides. Extra arguments are passed on to online_accu_train.py.
#   DATASET, ARCH   assert the checkpoint's dataset / arch        CKPT   checkpoint folder (checkpoints_base_bn)
#   MODEL           online checkpoint (epoch40.pth)               DEVICE cpu | cuda | cuda:N
#   EPOCHS          accumulative steps (100)                      OUT    results folder
#   MEMORIZED       memorized checkpoint for MD / DSC (default <CKPT>/epoch20.pth)
#   PY              python interpreter (.venv/bin/python if present)   EXTRA  more flags
set -euo pipefail
med=$1; shift
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
args=(--batch_size 100 --epoch "${EPOCHS:-100}" --test_batch_size 500 --log_name log_test_online_adv.txt
      --resume "${CKPT:-checkpoints_base_bn}" --use_bn --model_name "${MODEL:-epoch40.pth}"
      --mode eval --onlinemode train --lr 1e-1 --momentum 0.9
      --beta 1. --only_reg --threshold 0.18 --use_advtrigger --med "$med")
[ -n "${DATASET:-}" ] && args+=(--dataset "$DATASET")
[ -n "${ARCH:-}" ] && args+=(--arch "$ARCH")
[ -n "${DEVICE:-}" ] && args+=(--device "$DEVICE")
[ -n "${OUT:-}" ] && args+=(--out "$OUT")
[ -n "${MEMORIZED:-}" ] && args+=(--memorized_model "$MEMORIZED")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && args+=($EXTRA)
exec "$PY" online_accu_train.py "${args[@]}" "$@"
