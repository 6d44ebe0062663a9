"""The burn-in (SPEC "Phase 1"): ``config`` its settings, ``flags`` train_cifar.py's command line generated from
them, ``run`` the training (``run_burn_in``: resumable, in one process or under torchrun)."""
