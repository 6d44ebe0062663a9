#!/usr/bin/env bash
# Adversarial training under accumulative poisoning: the authors' run_at.sh command (see scripts/run_online.sh).
exec bash "$(dirname "$0")/scripts/run_online.sh" AT "$@"
