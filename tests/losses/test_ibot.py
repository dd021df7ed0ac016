"""The iBOT loss against the reference's arithmetic, centering and per-rank masks (single process and gloo),
the teacher's momentum schedule."""
import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tcae_ldm.losses.ibot import cosine_momentum, iBOTLoss
from tcae_ldm.losses.masking import generate_masks
from tcae_ldm.losses.ssl import SSLConfig, draw_masks
from tcae_ldm.utils.seeding import seed_of


def _loss_inputs(B=2, V=4, G=2, N=6, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(G * B, N, dtype=torch.bool)
    masks[0, :3] = True
    masks[-1, 2:] = True
    return dict(student_cls=torch.randn(V * B, K, generator=g), student_patch=torch.randn(G * B, N, K, generator=g),
                teacher_cls=torch.randn(G * B, K, generator=g), teacher_patch=torch.randn(G * B, N, K, generator=g),
                masks=masks)


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
    # Per image mean over its masked tokens, then mean over all four images (two of them unmasked: 0).
    t = F.softmax(x["teacher_patch"] / 0.07, -1)
    ce = -(t * F.log_softmax(x["student_patch"] / 0.1, -1)).sum(-1)
    expected = (ce[0, :3].mean() + ce[-1, 2:].mean()) / 4
    assert torch.allclose(base["mim"], expected, atol=1e-6)


def _reference_loss(s_cls, s_patch, t_cls, t_patch, masks, G, temp, temp2, student_temp=0.1, center=0.0,
                    center2=0.0):
    """iBOT's iBOTLoss.forward arithmetic (bytedance/ibot main_ibot.py), loop for loop: the teacher's outputs
    centered then sharpened; per view pair, the [CLS] cross-entropy's batch mean; for the same view, per image
    the masked tokens' mean (clamped count), then the batch mean; each sum divided by its number of terms."""
    s_cls_c, s_patch_c = (s_cls / student_temp).chunk(s_cls.shape[0] // (t_cls.shape[0] // G)), \
        (s_patch / student_temp).chunk(G)
    t_cls_c = F.softmax((t_cls - center) / temp, -1).chunk(G)
    t_patch_c = F.softmax((t_patch - center2) / temp2, -1).chunk(G)
    m_c = masks.flatten(1).float().chunk(G)
    cls, n_cls, mim, n_mim = 0.0, 0, 0.0, 0
    for q in range(G):
        for v in range(len(s_cls_c)):
            if v == q:
                tok = (-t_patch_c[q] * F.log_softmax(s_patch_c[v], -1)).sum(-1)        # (B, N)
                per_image = (tok * m_c[v]).sum(-1) / m_c[v].sum(-1).clamp(min=1.0)     # (B,)
                mim, n_mim = mim + per_image.mean(), n_mim + 1
            else:
                cls = cls + (-t_cls_c[q] * F.log_softmax(s_cls_c[v], -1)).sum(-1).mean()
                n_cls += 1
    return cls / n_cls, mim / n_mim


@pytest.mark.parametrize("V", [2, 6])
def test_loss_matches_the_reference_arithmetic_when_half_the_views_are_unmasked(V):
    G, B, N, K = 2, 4, 9, 7
    g = torch.Generator().manual_seed(V)
    x = dict(student_cls=torch.randn(V * B, K, generator=g), student_patch=torch.randn(G * B, N, K, generator=g),
             teacher_cls=torch.randn(G * B, K, generator=g), teacher_patch=torch.randn(G * B, N, K, generator=g))
    masks = torch.rand(G * B, N, generator=g) < 0.4
    masks[::2] = False                                   # half of the global views carry no mask at all
    masks[1, 0] = True                                   # (and every other one at least one masked token)
    assert masks.any(1).sum() == G * B // 2
    out = iBOTLoss(K, student_temp=0.1, warmup_teacher_temp=0.04, warmup_teacher_patch_temp=0.05,
                   warmup_steps=10)(**x, masks=masks, step=0, update_center=False)
    cls, mim = _reference_loss(*x.values(), masks, G, temp=0.04, temp2=0.05)
    assert torch.allclose(out["cls"], cls, atol=1e-6) and torch.allclose(out["mim"], mim, atol=1e-6)


@pytest.mark.parametrize("V", [2, 5])
def test_loss_matches_the_reference_with_centers_mid_warm_up_and_mixed_masks(V):
    """Non-zero centers (the [CLS] and patch centers differ), both teacher temperatures mid-warm-up with their
    own end points, some global views masked and some not: every term of the reference is exercised, and the
    centers then move by iBOT's EMA of the teacher's batch means."""
    G, B, N, K, Kp = 2, 3, 8, 6, 4
    g = torch.Generator().manual_seed(10 + V)
    x = dict(student_cls=torch.randn(V * B, K, generator=g), student_patch=torch.randn(G * B, N, Kp, generator=g),
             teacher_cls=torch.randn(G * B, K, generator=g), teacher_patch=torch.randn(G * B, N, Kp, generator=g))
    masks = torch.rand(G * B, N, generator=g) < 0.5
    masks[[0, 4]] = False                                # two images unmasked, the rest masked
    masks[[1, 2, 3, 5], 0] = True
    crit = iBOTLoss(K, Kp, student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_patch_temp=0.03, teacher_patch_temp=0.09, warmup_steps=10,
                    center_momentum=0.8, lambda_cls=0.7, lambda_mim=1.3)
    center, center2 = 3 * torch.randn(1, K, generator=g), 3 * torch.randn(1, 1, Kp, generator=g)
    crit.center.copy_(center)
    crit.center_patch.copy_(center2)
    out = crit(**x, masks=masks, step=3)
    temp, temp2 = 0.04 + 0.3 * (0.07 - 0.04), 0.03 + 0.3 * (0.09 - 0.03)
    cls, mim = _reference_loss(*x.values(), masks, G, temp=temp, temp2=temp2, center=center, center2=center2)
    assert torch.allclose(out["cls"], cls, atol=1e-6) and torch.allclose(out["mim"], mim, atol=1e-6)
    assert torch.allclose(out["loss"], 0.7 * cls + 1.3 * mim, atol=1e-6)
    # Centering matters on these inputs: the loss without it differs.
    cls0, mim0 = _reference_loss(*x.values(), masks, G, temp=temp, temp2=temp2)
    assert not torch.allclose(cls0, cls, atol=1e-3) and not torch.allclose(mim0, mim, atol=1e-3)
    # iBOT's update_center: center * m + batch mean * (1 - m), the patch center over images and tokens.
    assert torch.allclose(crit.center, 0.8 * center + 0.2 * x["teacher_cls"].mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(crit.center_patch, 0.8 * center2 + 0.2 * x["teacher_patch"].mean((0, 1), keepdim=True),
                          atol=1e-6)


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


def _mask_worker(rank, world_size, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        os.environ["PL_GLOBAL_SEED"] = "7"
        torch.save({s: draw_masks(SSLConfig(), 8, 14, step=s) for s in (0, 1)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masks_differ_per_ddp_rank_over_gloo(tmp_path):
    """Every rank draws its own masks, a function of (seed, step, rank): not the same masks on every GPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mask_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for step in (0, 1):
        assert not torch.equal(got[0][step], got[1][step])
        for rank in range(2):
            gen = torch.Generator().manual_seed(seed_of(7, step, rank))
            assert torch.equal(got[rank][step], generate_masks(8, 14, 14, generator=gen))


def test_momentum_schedule():
    ms = [cosine_momentum(s, 100) for s in range(101)]
    assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert cosine_momentum(500, 100) == 1.0 and cosine_momentum(50, 100, base=0.99) == pytest.approx(0.995)



def test_defaults_are_ibots_and_the_centers_keep_their_checkpoint_shapes():
    crit = iBOTLoss()
    assert (crit.student_temp, crit.cls_temps, crit.patch_temps) == (0.1, (0.04, 0.07), (0.04, 0.07))
    assert (crit.center_momentum, crit.lambda_cls, crit.lambda_mim, crit.warmup_steps) == (0.9, 1.0, 1.0, 0)
    assert crit.center.shape == (1, 8192) and crit.center_patch.shape == (1, 1, 8192)  # what checkpoints hold
    assert iBOTLoss(16, 4).center_patch.shape == (1, 1, 4)


def test_one_step_warm_up_and_momentum_edges():
    crit = iBOTLoss(3, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_steps=1)
    assert crit.teacher_temps(0) == (0.04, 0.04) and crit.teacher_temps(1) == pytest.approx((0.07, 0.07))
    assert iBOTLoss(3, warmup_steps=0).teacher_temps(0) == pytest.approx((0.07, 0.07))
    assert cosine_momentum(0, 0) == 1.0 and cosine_momentum(0, 1) == pytest.approx(0.996)


def test_gathered_student_patches_give_the_full_tensors_loss():
    """The student's patch logits of the masked tokens only ((M, Kp) in masks.nonzero() order), with N != Kp."""
    x = _loss_inputs(N=6, K=5)
    full = iBOTLoss(5)(**x, step=0, update_center=False)
    img, tok = x["masks"].nonzero(as_tuple=True)
    gathered = iBOTLoss(5)(**{**x, "student_patch": x["student_patch"][img, tok]}, step=0, update_center=False)
    assert torch.equal(full["mim"], gathered["mim"]) and torch.equal(full["cls"], gathered["cls"])


@pytest.mark.parametrize("G, t_rows, s_rows", [
    (2, 1, 4),   # fewer teacher rows than global views: B = 0
    (2, 3, 4),   # teacher rows not G x B
    (2, 4, 5),   # student rows not V x B
    (3, 6, 4),   # fewer student views than global views
    (1, 2, 2),   # a single view: nothing to distil across
])
def test_cls_shapes_that_do_not_fit_are_refused(G, t_rows, s_rows):
    crit = iBOTLoss(5, n_global_views=G)
    x = dict(student_cls=torch.randn(s_rows, 5), teacher_cls=torch.randn(t_rows, 5),
             student_patch=torch.randn(t_rows, 3, 5), teacher_patch=torch.randn(t_rows, 3, 5),
             masks=torch.ones(t_rows, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"expected teacher_cls with {G}\*B rows and student_cls with V\*B rows "
                                         rf"\(V >= {G}, V >= 2\); got \({t_rows}, 5\) and \({s_rows}, 5\)"):
        crit(**x, step=0)


@pytest.mark.parametrize("what", ["masks tokens", "teacher rows", "student tokens", "gathered count", "gathered dim"])
def test_patch_shapes_that_do_not_fit_are_refused(what):
    x = _loss_inputs(B=2, V=4, G=2, N=6, K=5)
    M = int(x["masks"].sum())
    bad = {"masks tokens": {"masks": torch.zeros(4, 7, dtype=torch.bool)},
           "teacher rows": {"teacher_patch": torch.randn(5, 6, 5)},
           "student tokens": {"student_patch": torch.randn(4, 7, 5)},
           "gathered count": {"student_patch": torch.randn(M + 1, 5)},
           "gathered dim": {"student_patch": torch.randn(M, 6)}}[what]
    x.update(bad)
    with pytest.raises(ValueError, match=r"patch shapes disagree: student \(.*\), teacher \(.*\), masks \(.*\) with "
                                         r"\d+ masked, 2 global views x B=2"):
        iBOTLoss(5)(**x, step=0)
