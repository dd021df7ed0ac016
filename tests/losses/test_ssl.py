"""iBOT on a toy student: the objective, the masks and the EMA teacher together make the loss fall."""
import math

import torch
import torch.nn as nn

from tcae_ldm.losses.ibot import cosine_momentum, iBOTLoss
from tcae_ldm.losses.masking import generate_masks
from tcae_ldm.models.ema import EMA, ema_update_
from tcae_ldm.models.ibot import iBOTHeads


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
    teacher = EMA(student, warmup=False).module  # the iBOT teacher: a frozen copy moved by EMA updates
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



#################################################################################
#                   The objective on a TC-AE encoder                            #
#################################################################################

from einops import rearrange  # noqa: E402

from tcae_ldm.losses.ssl import SSLConfig, draw_masks, iBOTObjective  # noqa: E402
from tcae_ldm.models.tcae import create_tcae  # noqa: E402


def _objective(**cfg):
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", image_size=32, latent_size=2, cls_token=True)
    kw = dict(out_dim=16, patch_out_dim=16, hidden_dim=24, bottleneck_dim=8, mask_probability=1.0)
    return net.encoder, iBOTObjective(net.encoder, net.width, SSLConfig(**{**kw, **cfg}))


def test_heads_read_normed_tokens_and_only_the_masked_ones_reach_the_patch_head():
    """Student and teacher features go through the encoder's final norm on the heads' stage; skipping the
    unmasked tokens in the student's heads leaves L_MIM unchanged."""
    encoder, obj = _objective()
    with torch.no_grad():  # a norm that is not the identity, so that forgetting it would show
        encoder.to_latent.norm.weight.fill_(2.0)
        encoder.to_latent.norm.bias.fill_(0.5)
    x = torch.randn(4, 3, 32, 32)
    cls, tok = obj.features(encoder, x)
    f = encoder.forward_features(x, upto="coarse")
    assert torch.allclose(tok, encoder.to_latent.norm(rearrange(f["coarse"], "b h w d -> b (h w) d")), atol=1e-6)
    assert torch.allclose(cls, encoder.to_latent.norm(f["coarse_cls"][:, 0]), atol=1e-6)
    assert torch.allclose(tok.mean(-1), torch.full((4, 16), 0.5), atol=1e-5)
    # heads on the masked tokens only == heads on all tokens, then gathered
    masks = draw_masks(obj.cfg, 4, 4, step=3).flatten(1)
    assert masks.any()
    c_all, p_all = obj.heads(cls, tok)
    c_some, p_some = obj.heads(cls, tok[masks])
    assert torch.allclose(c_all, c_some, atol=1e-6) and torch.allclose(p_all[masks], p_some, atol=1e-6)
    t_cls, t_patch = obj.teacher["heads"](cls, tok)
    full = obj.loss(c_all, p_all, t_cls, t_patch, masks, step=0, update_center=False)
    part = obj.loss(c_some, p_some, t_cls, t_patch, masks, step=0, update_center=False)
    assert torch.allclose(full["mim"], part["mim"], atol=1e-6) and torch.allclose(full["cls"], part["cls"])


def test_masks_are_drawn_on_the_heads_grid_and_hide_whole_tokens():
    encoder, obj = _objective(mask_ratio=0.5, mask_ratio_var=0.0)
    B = 3
    views = torch.randn(B, 2, 3, 32, 32)
    loss, logs = obj(encoder, views, torch.randn(B, 2, 3, 16, 16), step=5)
    masks = draw_masks(obj.cfg, 2 * B, 4, step=5)       # 32 px / (patch 4 x stride 2) = a 4x4 coarse grid
    assert logs["mask_ratio"] == masks.float().mean() and torch.isfinite(loss)
    assert torch.equal(masks, draw_masks(obj.cfg, 2 * B, 4, step=5))
    assert not torch.equal(masks, draw_masks(obj.cfg, 2 * B, 4, step=6))
    # each image: 8 of 16 tokens at most, in blocks of at least (4 // 3) ** 2 = 1
    assert masks.flatten(1).sum(1).max() <= 8 and masks.flatten(1).any(1).all()


def test_freeze_last_layer_drops_the_prototypes_gradient_for_the_first_steps():
    encoder, obj = _objective(freeze_last_layer_steps=2)
    loss, _ = obj(encoder, torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16), step=0)
    loss.backward()
    last = obj.last_layer_parameters()
    assert [p.shape for p in last] == [(16, 1), (16, 8)]  # the prototypes' length (frozen) and directions
    assert last[1].grad is not None
    assert obj.cancel_last_layer_grads(step=1) and all(p.grad is None for p in last)
    assert any(p.grad is not None for p in obj.heads.cls_head.mlp.parameters())  # the rest of the head learns
    loss, _ = obj(encoder, torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16), step=2)
    loss.backward()
    assert not obj.cancel_last_layer_grads(step=2) and last[1].grad is not None


def test_a_batch_without_any_masked_token():
    encoder, obj = _objective(mask_probability=0.0)
    loss, logs = obj(encoder, torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16), step=0)
    assert logs["mask_ratio"] == 0 and logs["ibot_mim"] == 0 and torch.isfinite(loss)
    loss.backward()
