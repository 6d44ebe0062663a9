#!/usr/bin/env bash
# Shared body of run_st.sh / run_at.sh / run_dsc.sh: the authors' command for one defence ($1), with
# environment overrides. Extra arguments are passed on to online_accu_train.py.
#   DATASET, ARCH   assert the checkpoint's dataset / arch        CKPT   checkpoint folder (checkpoints_base_bn)
#   MODEL           online checkpoint (epoch40.pth)               DEVICE cpu | cuda | cuda:N
#   EPOCHS          accumulative steps (100)                      OUT    results folder
#   MEMORIZED       memorized checkpoint for MD / DSC (default <CKPT>/epoch20.pth)
#   PY              python interpreter (default: the repository's .venv)   EXTRA  more flags
# CKPT, MEMORIZED and OUT may be relative to the directory you call the script from.
# The flags below are the authors' run_*.sh command; tests/test_structure.py checks that they give the
# configuration utils/online/config.py's authors_config() describes.
set -euo pipefail
med=$1; shift
caller=$PWD
repo="$(cd "$(dirname "$0")/.." && pwd)"
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$caller" "$1" ;; esac; }
if [ -z "${PY:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then
    PY="$repo/.venv/bin/python"
  else
    echo "error: no virtual environment at $repo/.venv; create it with 'make venv' in $repo (or set PY to a" \
         "python that has torch and torchvision)" >&2
    exit 1
  fi
fi
args=(--batch_size 100 --epoch "${EPOCHS:-100}" --test_batch_size 500 --log_name log_test_online_adv.txt
      --resume "$(abs "${CKPT:-$repo/checkpoints_base_bn}")" --use_bn --model_name "${MODEL:-epoch40.pth}"
      --mode eval --onlinemode train --lr 1e-1 --momentum 0.9
      --beta 1. --only_reg --threshold 0.18 --use_advtrigger --med "$med")
[ -n "${DATASET:-}" ] && args+=(--dataset "$DATASET")
[ -n "${ARCH:-}" ] && args+=(--arch "$ARCH")
[ -n "${DEVICE:-}" ] && args+=(--device "$DEVICE")
[ -n "${OUT:-}" ] && args+=(--out "$(abs "$OUT")")
[ -n "${MEMORIZED:-}" ] && args+=(--memorized_model "$(abs "$MEMORIZED")")
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && args+=($EXTRA)
cd "$repo"
exec "$PY" online_accu_train.py "${args[@]}" "$@"
