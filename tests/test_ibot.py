"""iBOT heads, block-wise masking, loss/centering (single process and gloo), EMA teacher, tiny overfit."""
import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from tcae_ldm.models.ibot import (BlockMaskGenerator, cosine_momentum, ema_update_, generate_masks, iBOTHead,
                                  iBOTHeads, iBOTLoss, make_teacher, sample_mask_ratios)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- heads

def test_head_weight_norm_shapes_and_frozen_magnitude():
    head = iBOTHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    assert not hasattr(head.last_layer, "weight_g")  # not the deprecated torch.nn.utils.weight_norm
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    assert head(torch.randn(5, 16)).shape == (5, 32)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 32)
    # The frozen magnitude gets no gradient; the directions do.
    head(torch.randn(4, 16)).sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    assert iBOTHead(16, 32, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_shared_vs_separate_heads():
    kw = dict(hidden_dim=24, bottleneck_dim=8, nlayers=2)
    shared = iBOTHeads(16, 32, shared=True, **kw)
    separate = iBOTHeads(16, 32, patch_out_dim=20, shared=False, **kw)
    assert n_params(separate) - n_params(shared) == n_params(iBOTHead(16, 20, **kw))
    cls, patches = torch.randn(3, 16), torch.randn(3, 5, 16)
    c, p = shared(cls, patches)
    assert c.shape == (3, 32) and p.shape == (3, 5, 32)
    # A shared head treats a [CLS] token exactly like a patch token.
    assert torch.allclose(shared(cls, cls[:, None])[1][:, 0], c, atol=1e-6)
    c, p = separate(cls, patches)
    assert c.shape == (3, 32) and p.shape == (3, 5, 20)
    with pytest.raises(ValueError, match="shared=False"):
        iBOTHeads(16, 32, patch_out_dim=20, shared=True)


# ----------------------------------------------------------------------------- masking

def test_block_masks_reach_target_ratio():
    make = BlockMaskGenerator(14, 14)
    g = torch.Generator().manual_seed(0)
    for ratio in (0.1, 0.3, 0.5):
        target = round(ratio * 14 * 14)
        for _ in range(30):
            count = int(make(target, g).sum())
            assert target - 3 <= count <= target  # never overshoots; may stop a few tokens short


def test_single_block_is_a_rectangle():
    make = BlockMaskGenerator(16, 16)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        mask = torch.zeros(16, 16, dtype=torch.bool)
        added = make.add_block(mask, 40, g)
        assert added == int(mask.sum()) > 0
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all() and h * w == added
        assert 0.3 / 2 <= h / w <= 2 / 0.3  # aspect in [0.3, 1/0.3] up to rounding of small sides


def test_mask_probability_ratios_and_reproducibility():
    g = torch.Generator().manual_seed(2)
    ratios = sample_mask_ratios(4000, ratio=0.3, ratio_var=0.2, mask_probability=0.5, generator=g)
    on = ratios > 0
    assert abs(on.float().mean().item() - 0.5) < 0.03
    assert ratios[on].min() >= 0.1 - 1e-9 and ratios[on].max() <= 0.5 + 1e-9
    assert abs(ratios[on].mean().item() - 0.3) < 0.01
    assert sample_mask_ratios(100, ratio=0.9, ratio_var=0.3, mask_probability=1.0, generator=g).max() < 1.0

    masks = generate_masks(400, 8, 8, mask_probability=0.3, generator=torch.Generator().manual_seed(3))
    assert masks.shape == (400, 8, 8) and masks.dtype == torch.bool
    assert abs(masks.flatten(1).any(1).float().mean().item() - 0.3) < 0.07
    a = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(7))
    b = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(7))
    c = generate_masks(16, 8, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- loss

def _loss_inputs(B=2, V=4, G=2, N=6, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(G * B, N, dtype=torch.bool)
    masks[0, :3] = True
    masks[-1, 2:] = True
    return dict(student_cls=torch.randn(V * B, K, generator=g), student_patch=torch.randn(G * B, N, K, generator=g),
                teacher_cls=torch.randn(G * B, K, generator=g), teacher_patch=torch.randn(G * B, N, K, generator=g),
                masks=masks)


def test_loss_finite_and_weighted():
    loss = iBOTLoss(5, lambda_cls=0.5, lambda_mim=2.0)(**_loss_inputs(), step=0)
    assert all(torch.isfinite(v) for v in loss.values())
    assert torch.allclose(loss["loss"], 0.5 * loss["cls"] + 2.0 * loss["mim"])


def test_cls_term_matches_hand_computation():
    crit = iBOTLoss(3, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_steps=10, student_temp=0.1)
    assert crit.teacher_temps(0) == (0.04, 0.04) and crit.teacher_temps(20) == pytest.approx((0.07, 0.07))
    assert crit.teacher_temps(5) == pytest.approx((0.055, 0.055))
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])  # student views 0, 1 of one image
    t = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, -0.2]])  # teacher views 0, 1
    out = crit(s, torch.zeros(2, 1, 3), t, torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.bool), step=0)

    def ce(t_logits, s_logits):
        p = [math.exp(x / 0.04) for x in t_logits]
        q = [math.exp(x / 0.1) for x in s_logits]
        return -sum(pi / sum(p) * math.log(qi / sum(q)) for pi, qi in zip(p, q))

    expected = 0.5 * (ce(t[0].tolist(), s[1].tolist()) + ce(t[1].tolist(), s[0].tolist()))
    assert out["cls"].item() == pytest.approx(expected, rel=1e-5)
    assert out["mim"].item() == 0.0  # nothing masked


def test_mim_ignores_unmasked_positions():
    crit = iBOTLoss(5)
    x = _loss_inputs()
    base = crit(**x, step=0, update_center=False)
    x2 = copy.deepcopy(x)
    x2["student_patch"][~x["masks"]] = torch.randn(int((~x["masks"]).sum()), 5) * 10
    assert torch.equal(crit(**x2, step=0, update_center=False)["mim"], base["mim"])
    x2["student_patch"][x["masks"]] += torch.randn(int(x["masks"].sum()), 5)  # (a constant shift would not count)
    assert crit(**x2, step=0, update_center=False)["mim"] != base["mim"]
    # Per image mean over its masked tokens, then mean over the two images that have any.
    t = F.softmax(x["teacher_patch"] / 0.07, -1)
    ce = -(t * F.log_softmax(x["student_patch"] / 0.1, -1)).sum(-1)
    expected = 0.5 * (ce[0, :3].mean() + ce[-1, 2:].mean())
    assert torch.allclose(base["mim"], expected, atol=1e-6)


def test_center_update_single_process():
    crit = iBOTLoss(5, center_momentum=0.9)
    crit.center.fill_(0.3)
    crit.center_patch.fill_(-0.1)
    x = _loss_inputs()
    c0, cp0 = crit.center.clone(), crit.center_patch.clone()
    crit(**x, step=0)
    mean_cls = x["teacher_cls"].mean(0, keepdim=True)
    mean_patch = x["teacher_patch"].mean((0, 1), keepdim=True)
    assert torch.allclose(crit.center - c0, 0.1 * (mean_cls - c0), atol=1e-6)
    assert torch.allclose(crit.center_patch - cp0, 0.1 * (mean_patch - cp0), atol=1e-6)
    assert crit.center.dtype == torch.float32
    crit.update_center(x["teacher_cls"].bfloat16(), x["teacher_patch"].bfloat16())  # fp32 regardless
    assert crit.center.dtype == torch.float32 and "center" in crit.state_dict()


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3 + rank, 4, generator=g), torch.randn(3 + rank, 5, 4, generator=g)  # uneven on purpose


def _center_worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        crit = iBOTLoss(4, center_momentum=0.9)
        crit.update_center(*_rank_batch(rank))
        torch.save({"center": crit.center, "center_patch": crit.center_patch}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_center_update_all_reduced_over_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_center_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    cls = torch.cat([_rank_batch(r)[0] for r in range(2)])
    patch = torch.cat([_rank_batch(r)[1] for r in range(2)])
    for res in results:
        assert torch.allclose(res["center"], 0.1 * cls.mean(0, keepdim=True), atol=1e-6)
        assert torch.allclose(res["center_patch"], 0.1 * patch.mean((0, 1), keepdim=True), atol=1e-6)
    assert torch.equal(results[0]["center"], results[1]["center"])


# ----------------------------------------------------------------------------- EMA

def test_momentum_schedule():
    ms = [cosine_momentum(s, 100) for s in range(101)]
    assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert cosine_momentum(500, 100) == 1.0 and cosine_momentum(50, 100, base=0.99) == pytest.approx(0.995)


def test_ema_teacher_gets_no_grad_and_moves_exactly():
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), iBOTHead(8, 6, hidden_dim=8, bottleneck_dim=4))
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(5, 4)
    student(x).square().mean().backward()
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5).step()
    assert all(p.grad is None for p in teacher.parameters())
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        sp = dict(student.named_parameters())[n]
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * sp, atol=1e-7), n
        assert not p.requires_grad
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)  # buffers are copied
    g = teacher[2].last_layer.parametrizations.weight.original0
    assert torch.all(g == 1)
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(nn.Linear(4, 8), student, 0.9)


# ----------------------------------------------------------------------------- tiny overfit

class _TinyStudent(nn.Module):
    """Token MLP encoder + iBOT heads; masked input tokens are replaced by a learned mask token."""

    def __init__(self, d_in=8, dim=32, k=16):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(d_in))
        self.enc = nn.Sequential(nn.Linear(d_in, dim), nn.GELU(), nn.Linear(dim, dim))
        self.heads = iBOTHeads(dim, k, hidden_dim=32, bottleneck_dim=16, nlayers=2)

    def forward(self, tokens, mask=None):
        if mask is not None:
            tokens = torch.where(mask[..., None], self.mask_token, tokens)
        h = self.enc(tokens)                       # (B, N, D)
        return self.heads(h.mean(1), h)            # (B, K), (B, N, K)


@pytest.fixture
def one_thread():
    # Tiny ops are dominated by intra-op threading overhead on small CPUs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_overfit_loss_decreases(one_thread):
    torch.manual_seed(0)
    B, N, d = 8, 9, 8
    base = torch.randn(B, N, d)
    views = [base + 0.1 * torch.randn(B, N, d) for _ in range(4)]  # 2 global + 2 local "crops"
    glob = torch.cat(views[:2])                                    # (2B, N, d)
    local = torch.cat(views[2:])[:, :4]                            # (2B, 4, d) smaller local crops
    masks = generate_masks(2 * B, 3, 3, ratio=0.4, ratio_var=0.1, mask_probability=1.0, min_num_patches=2,
                           generator=torch.Generator().manual_seed(0)).flatten(1)
    student = _TinyStudent()
    teacher = make_teacher(student)
    crit = iBOTLoss(16, teacher_temp=0.04, teacher_patch_temp=0.04)
    # Start from centers settled on the initial teacher: with zero centers a fresh teacher and student
    # agree trivially (every image on the same prototypes), and the loss first rises as centering
    # spreads the targets, which says nothing about learning.
    with torch.no_grad():
        t_cls, t_patch = teacher(glob)
    crit.center.copy_(t_cls.mean(0, keepdim=True))
    crit.center_patch.copy_(t_patch.mean((0, 1), keepdim=True))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    steps, losses = 300, []
    for step in range(steps):
        s_cls_g, s_patch = student(glob, masks)
        s_cls_l, _ = student(local)
        with torch.no_grad():
            t_cls, t_patch = teacher(glob)
        out = crit(torch.cat([s_cls_g, s_cls_l]), s_patch, t_cls, t_patch, masks, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ema_update_(teacher, student, cosine_momentum(step, steps))
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
