"""The one EMA routine: the evaluation EMA of the trained networks and iBOT's teacher both move by it."""
import pytest
import torch
import torch.nn as nn

from tcae_ldm.models.ema import EMA, ema_update_
from tcae_ldm.models.ibot import iBOTHead


def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), iBOTHead(8, 6, hidden_dim=8, bottleneck_dim=4))


def test_update_lerps_trained_parameters_and_copies_the_rest():
    student = _student()
    average = EMA(student, decay=0.9, warmup=False).module
    assert not any(p.requires_grad for p in average.parameters())
    student(torch.randn(5, 4)).square().mean().backward()
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5).step()
    assert all(p.grad is None for p in average.parameters())
    before = {n: p.clone() for n, p in average.named_parameters()}
    ema_update_(average, student, 0.9)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    for n, p in average.named_parameters():
        sp = dict(student.named_parameters())[n]
        want = 0.9 * before[n] + 0.1 * sp if n in trained else sp
        assert torch.allclose(p, want, atol=1e-7), n
    assert torch.equal(average[1].running_mean, student[1].running_mean)  # buffers are copied
    g = average[2].last_layer.weight_g  # frozen prototype lengths: copied, exactly 1
    assert not student[2].last_layer.weight_g.requires_grad and torch.all(g == 1)


def test_frozen_parameters_never_drift():
    student = _student()
    student[0].requires_grad_(False)  # e.g. the encoder during decoder finetuning
    ema = EMA(student, decay=0.999, warmup=False)
    with torch.no_grad():
        student[0].weight.add_(1.0)  # changed outside any optimiser: the copy follows at once
    ema.update(student, step=1)
    assert torch.equal(ema.module[0].weight, student[0].weight)


def test_warmup_decay_and_mismatched_networks():
    ema = EMA(nn.Linear(2, 2), decay=0.9999)
    assert ema.current_decay(0) == pytest.approx(0.1) and ema.current_decay(10 ** 6) == 0.9999
    assert EMA(nn.Linear(2, 2), decay=0.99, warmup=False).current_decay(0) == 0.99
    ema.train()
    assert not ema.training and not ema.module.training  # the average is only ever evaluated
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(nn.Linear(4, 8), _student(), 0.9)
