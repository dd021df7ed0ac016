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

