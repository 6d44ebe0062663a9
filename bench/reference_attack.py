"""A reference with the structure of the authors' code (ShawnXYang/AccumulativeAttack: ``craft_accu``,
``adapt_tensor`` and ``test``), with our argument order: the equality check of ``test_reference.py`` and the
baseline of ``bench/bench_online.py``.

* crafting: every parameter gradient built with ``create_graph=True, retain_graph=True`` (also the clean
  gradient and the second-order term, which need no graph), once per call as in their ``craft_accu``
  (``recompute``: rebuilt inside every one of the K steps); their projection
  ``clamp(x0 + clamp(x' - x0, -eps, eps), 0, 1)``;
* evaluation: float32 batches of 100 through a ``torch.utils.data.DataLoader`` over a ``TensorDataset``,
  optionally with their per-sample per-class bookkeeping.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from utils.core.data import Split


def _authors_projection(x_new: torch.Tensor, x0: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Their update: eta = clamp(x' - x0, -eps, eps); clamp(x0 + eta, 0, 1)."""
    eta = torch.clamp(x_new - x0, -epsilon, epsilon)
    return torch.clamp(x0 + eta, 0, 1.0)


def _authors_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                   y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[tuple, tuple]:
    """The clean gradient and the second-order term, every gradient with create_graph as in their code."""
    params = list(model.parameters())
    with torch.enable_grad():
        loss_tri = F.cross_entropy(model(x_trigger), y_trigger)
        g_tri = torch.autograd.grad(loss_tri, params, retain_graph=True, create_graph=True)
        model.zero_grad()
        loss_val = F.cross_entropy(model(x_val), y_val)
        g_val = torch.autograd.grad(loss_val, params, retain_graph=True, create_graph=True)
        model.zero_grad()
        loss_train = F.cross_entropy(model(x), y)
        g_train = torch.autograd.grad(loss_train, params, retain_graph=True, create_graph=True)
        model.zero_grad()
        c = 0
        for a, b in zip(g_tri, g_val):
            c += F.normalize(a.flatten(), p=2, dim=0) @ F.normalize(b.flatten(), p=2, dim=0)
        second = torch.autograd.grad(c, params, retain_graph=True, create_graph=True)
        model.zero_grad()
    return g_train, second


def baseline_craft_accu(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                        y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                        epsilon: float = 0.2, num_steps: int = 2, gamma: float = 1.0,
                        recompute: bool = False) -> torch.Tensor:
    """Accumulative crafting (objective reg) with the structure of the authors' ``craft_accu``."""
    step_size = 2.0 * epsilon / num_steps
    model.eval()
    params = list(model.parameters())
    x_pgd = x.detach().clone().requires_grad_(True)
    if not recompute:
        g_train, second = _authors_terms(model, x, y, x_trigger, y_trigger, x_val, y_val)
    for _ in range(num_steps):
        if recompute:
            # drop the last step's graphs first, else two steps' graphs coexist (ResNet-18 ran out of memory)
            g_train = second = loss_adv = g_adv = obj = None
            g_train, second = _authors_terms(model, x, y, x_trigger, y_trigger, x_val, y_val)
        with torch.enable_grad():
            loss_adv = F.cross_entropy(model(x_pgd), y)
            g_adv = torch.autograd.grad(loss_adv, params, retain_graph=True, create_graph=True)
            model.zero_grad()
            obj = 0
            for ga, gt, s in zip(g_adv, g_train, second):
                obj += F.normalize(ga.flatten(), p=2, dim=0) @ (gamma * F.normalize(gt.flatten(), p=2, dim=0)
                                                                + F.normalize(s.flatten(), p=2, dim=0))
            (x_grad,) = torch.autograd.grad(obj, x_pgd)
        x_new = x_pgd.detach() + step_size * x_grad.sign()
        x_pgd = _authors_projection(x_new, x.detach(), epsilon).requires_grad_(True)
    return x_pgd.detach()


def baseline_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Their ``adapt_tensor`` (train mode, one step)."""
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def authors_test_loader(split: Split, batch_size: int = 100) -> DataLoader:
    """Their test loader: the split as float32 in [0, 1] on the CPU, in order, batches of 100."""
    return DataLoader(TensorDataset(split.x.cpu().contiguous().float().div(255), split.y.cpu()),
                      batch_size=batch_size, shuffle=False)


def baseline_test(model: nn.Module, loader: DataLoader, device: torch.device, bookkeeping: bool = False) -> float:
    """Their ``test`` (no_grad, batches from a DataLoader) as a test error; optionally their per-sample counting."""
    model.eval()
    correct, total = 0, 0
    per_class_correct, per_class_total = [0] * 1000, [0] * 1000
    losses = []
    for inputs, labels in loader:
        with torch.no_grad():
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            _, predicted = outputs.max(1)
            hit = predicted.eq(labels).cpu()
            if bookkeeping:
                losses.append(F.cross_entropy(outputs, labels, reduction="none").cpu())
        if bookkeeping:
            for j in range(len(labels)):
                lbl = labels[j]
                per_class_total[lbl] += 1
                per_class_correct[lbl] += int(hit[j].item())
        correct += hit.sum().item()
        total += len(labels)
    return (total - correct) / total
