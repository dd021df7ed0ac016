"""The learning-rate schedule's values at chosen steps (warm-up, mid-cosine, end), the LR each optimizer step of
an autoencoder fit uses, and which parameters get weight decay."""
import math

import lightning as L
import pytest
import torch

from tcae_ldm.lit.schedules import param_groups, set_lr, warmup_cosine
from tests.tiny import tiny_data, tiny_module, tiny_trainer


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 4), (1, 2 / 4), (3, 4 / 4),                                     # linear warm-up, full LR on its last step
    (4, 1.0),                                                               # cosine starts at the top
    (6, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))),                 # a quarter of the way down
    (8, 0.1 + 0.9 * 0.5),                                                   # half-way: mean of top and floor
    (11, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))),
    (12, 0.1), (50, 0.1),                                                   # the floor, and it stays there
])
def test_warmup_cosine_values(step, expected):
    assert warmup_cosine(step, warmup_steps=4, total_steps=12, min_lr_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_without_warm_up_or_floor():
    assert warmup_cosine(0, 0, 10) == 1.0
    assert warmup_cosine(5, 0, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 0, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(3, 3, 3) == pytest.approx(1.0)  # warm-up as long as the run: no division by zero
    assert warmup_cosine(3, 2, 3) == pytest.approx(0.0, abs=1e-12)  # one cosine step: straight to the floor


def test_set_lr_scales_the_remembered_base_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.4}, {"params": [], "lr": 2.0}])
    set_lr(opt, 0.5)
    set_lr(opt, 0.25)  # a factor of the base rate, not of the current one
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert [g["base_lr"] for g in opt.param_groups] == [0.4, 2.0]


def test_param_groups_exempt_biases_norms_tokens_and_positions():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.pos = torch.nn.Module()
            self.pos.embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    net = Net()
    decay, no_decay = param_groups(net)
    assert [id(p) for p in decay["params"]] == [id(net.lin.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(net.lin.bias), id(net.norm.weight), id(net.norm.bias),
                                                   id(net.cls_token), id(net.pos.embed)}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay


class _RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])


def test_autoencoder_steps_use_the_schedule(tmp_path):
    """Each generator and critic step of a fit runs at base LR x warmup_cosine(step): warm-up, cosine, floor."""
    L.seed_everything(0)
    rec = _RecordLR()
    module = tiny_module(max_steps=5, warmup_steps=2, min_lr_ratio=0.2)
    tiny_trainer(str(tmp_path), callbacks=[rec]).fit(module, tiny_data())
    expected = [1e-3 * warmup_cosine(s, 2, 5, 0.2) for s in range(5)]
    assert expected[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3]) and expected[4] < 1e-3
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected, rel=1e-9)
    assert [lr[1] for lr in rec.lrs] == pytest.approx(expected, rel=1e-9)  # the critic follows the same schedule
