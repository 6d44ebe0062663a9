"""A new measurement and a new defender, each one class, registered (docs/LIBRARY.md)."""
import torch
import torch.nn.functional as F

from utils.core.grads import eval_mode
from utils.core.train import sgd_step
from utils.defense.defenders import DEFENDERS, Defender
from utils.detect.measure import MEASUREMENTS, Measurement


class ReceivedLoss(Measurement):
    """Mean CE of the batch the learner receives, before its step: a field of every steps.jsonl line."""
    name = "received_loss"

    def measure(self, model, arrival):
        with torch.no_grad(), eval_mode(model):
            return {"received_loss": F.cross_entropy(model(arrival.x_in), arrival.y).item()}


class FirstHalf(Defender):
    """Learn from the first half of every arriving batch only (--med HALF)."""
    name = "HALF"

    def step(self, learner, x, y, t, niter=1):
        sgd_step(learner, x[: len(x) // 2], y[: len(y) // 2], niter)
        return {}


MEASUREMENTS.append(ReceivedLoss)
DEFENDERS["HALF"] = FirstHalf
