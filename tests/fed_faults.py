"""A fault for the Flower tests: a ClientApp mod (imported by Flower's worker processes by name) under which client 1
fails in round 2, as a lost machine would."""
from __future__ import annotations


def lose_client_1_in_round_2(message, context, call_next):
    config = message.content["config"]
    if int(config["client"]) == 1 and int(config["round"]) == 2:
        raise RuntimeError("client 1's machine went away")
    return call_next(message, context)
