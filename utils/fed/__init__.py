"""Federated learning under the accumulative attack (SPEC "Federated learning"): the clients' data split, honest and
malicious clients, the aggregators and their registry, the per-update screening scores, the round loop and the run,
in one process or on Flower (``flower``, the only module that imports flwr)."""
