"""The library behind the scripts, in layers; each imports only the layers below it (tests/test_structure.py):

    errors, fields   the one error type and the CLI wrapper; typed configuration, one source per flag
    io               the results writer (atomic files, JSON lines, the folder lock)
    core             data, the stream, models, checkpoints, gradients, MD, metrics, training, the learner
    attack           the attack's mathematics (craft) and the attacker's role (attacker)
    defense          ST, AT, DSC and their registry                      (imports attack: AT's PGD)
    detect           the detectors and the measurements of a run, with their registries
    online, burnin   one online run (config, flags, context, the loop); the burn-in
    fed              federated learning: split, clients, aggregators, scores, the rounds, the run, Flower
    sweep            presets, overrides, reuse of finished work, sweeps in one process or on Ray
    report           tables, figures, costs
"""
