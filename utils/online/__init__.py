"""One online run (SPEC "Phase 2", "The attack" step 3): ``config`` its typed configuration, ``flags`` the
command line generated from it, ``context`` what a run loads and draws, ``run`` the loop (``run_online``)."""
