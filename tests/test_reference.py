"""Our attack and evaluation against the authors'-structure reference (tests/reference_attack.py) on a tiny
model: bit-identical poisons and the same test error (the benchmark's baseline is only fair if they agree)."""
import pytest
import torch

from reference_attack import authors_test_loader, baseline_craft_accu, baseline_test
from utils.attack.craft import craft_accumulative_poison, craft_poisoned_trigger
from utils.core.data import DATASETS, Split
from utils.core.models import build_model, model_spec
from utils.core.train import evaluate

INFO = DATASETS["fashion-mnist"]
SHAPE = (INFO.in_channels, INFO.image_size, INFO.image_size)


@pytest.fixture(scope="module")
def setting():
    """A tiny SmallCNN in eval mode, a batch of 16, a trigger of 16 and a validation batch of 32 in [0, 1]."""
    torch.manual_seed(0)
    model = build_model(model_spec("cnn", INFO, width=4)).eval()
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        return torch.rand((n, *SHAPE), generator=gen), torch.randint(0, INFO.num_classes, (n,), generator=gen)

    (x, y), (x_tri, y_tri), (x_val, y_val) = batch(16), batch(16), batch(32)
    x_tri = craft_poisoned_trigger(model, x_tri, y_tri, x_val, y_val, epsilon=0.2, num_steps=2)
    test = Split(torch.randint(0, 256, (250, *SHAPE), generator=gen, dtype=torch.uint8),
                 torch.randint(0, INFO.num_classes, (250,), generator=gen))
    return model, (x, y, x_tri, y_tri, x_val, y_val), test


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("epsilon,num_steps", [(0.2, 2), (0.05, 3)])
def test_reference_crafts_our_poisons(setting, recompute, epsilon, num_steps):
    model, batches, _ = setting
    ours = craft_accumulative_poison(model, *batches, epsilon=epsilon, num_steps=num_steps, objective="reg")
    theirs = baseline_craft_accu(model, *batches, epsilon=epsilon, num_steps=num_steps, recompute=recompute)
    assert not torch.equal(ours, batches[0])  # the poison moved
    assert torch.equal(ours, theirs)


def test_reference_evaluation_is_ours(setting):
    model, _, test = setting
    assert baseline_test(model, authors_test_loader(test), torch.device("cpu")) == evaluate(model, test, 64)
    assert baseline_test(model, authors_test_loader(test), torch.device("cpu"), bookkeeping=True) == \
        evaluate(model, test, 1000)
