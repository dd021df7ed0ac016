"""L_iBOT = L_[CLS] + L_MIM on the TC-AE encoder: the student is the encoder + heads, the teacher their EMA.

The heads, the teacher and the centering live here; the encoder stays owned by the autoencoder, so the
reconstruction and SSL losses share its weights and its single backward pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from tcae_ldm.losses.ibot import cosine_momentum, iBOTLoss
from tcae_ldm.losses.masking import generate_masks
from tcae_ldm.models.ema import ema_update_
from tcae_ldm.models.ibot import iBOTHeads


@dataclass
class SSLConfig:
    """Joint iBOT objective; every field is a config key under `model.ssl`.

    Args:
        alpha: weight of L_rec in total = alpha * L_rec + L_iBOT.
        heads_on: tokens the heads read: 'coarse' (stage 2) or 'fine' (see configs/tcae.yaml for why).
        out_dim: [CLS] head output (prototypes; iBOT: 8192).
        patch_out_dim: patch head output.
        shared_head: one head for [CLS] and patch tokens (iBOT's default).
        hidden_dim: head MLP width (iBOT: 2048).
        bottleneck_dim: head bottleneck before the weight-normalised layer (iBOT: 256).
        head_layers: MLP layers of the head.
        mask_ratio: mean fraction of patches masked in a masked global view.
        mask_ratio_var: the ratio is drawn uniformly in [ratio - var, ratio + var].
        mask_probability: fraction of global views that are masked at all.
        student_temp: student softmax temperature.
        teacher_temp: [CLS] teacher temperature after warm-up.
        teacher_patch_temp: patch teacher temperature after warm-up.
        warmup_teacher_temp: both teacher temperatures start here.
        teacher_temp_warmup_steps: steps until the teacher temperatures reach their final value.
        momentum_base: teacher EMA momentum, cosine schedule to 1 over training.
        lambda_cls: weight of L_CLS.
        lambda_mim: weight of L_MIM.
    """
    alpha: float = 1.0                  # total = alpha * L_rec + L_iBOT
    heads_on: Literal["fine", "coarse"] = "coarse"  # tokens the heads read (see configs/tcae.yaml for why)
    out_dim: int = 8192                 # [CLS] head output (prototypes)
    patch_out_dim: int = 8192           # patch head output
    shared_head: bool = True            # one head for [CLS] and patch tokens (iBOT's default)
    hidden_dim: int = 2048              # head MLP width
    bottleneck_dim: int = 256           # head bottleneck before the weight-normalised layer
    head_layers: int = 3
    mask_ratio: float = 0.3             # mean fraction of patches masked in a masked global view
    mask_ratio_var: float = 0.2         # ratio drawn uniformly in [ratio - var, ratio + var]
    mask_probability: float = 0.5       # fraction of global views that are masked at all
    student_temp: float = 0.1
    teacher_temp: float = 0.07          # [CLS] teacher temperature after warm-up
    teacher_patch_temp: float = 0.07    # patch teacher temperature after warm-up
    warmup_teacher_temp: float = 0.04   # both teacher temperatures start here ...
    teacher_temp_warmup_steps: int = 10000  # ... and reach their final value after this many steps
    momentum_base: float = 0.996        # teacher EMA momentum, cosine schedule to 1 over training
    lambda_cls: float = 1.0
    lambda_mim: float = 1.0


torch.serialization.add_safe_globals([SSLConfig])


class iBOTObjective(nn.Module):
    """Student heads, EMA teacher (encoder copy + heads copy) and the iBOT loss."""

    def __init__(self, encoder: nn.Module, width: int, cfg: SSLConfig):
        super().__init__()
        if encoder.cls_token is None:
            raise ValueError("iBOT needs an encoder built with cls_token=True")
        self.cfg = cfg
        self.heads = iBOTHeads(width, cfg.out_dim, cfg.patch_out_dim, shared=cfg.shared_head,
                               hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim, nlayers=cfg.head_layers)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "heads": copy.deepcopy(self.heads)})
        self.teacher.requires_grad_(False)
        self.loss = iBOTLoss(cfg.out_dim, cfg.patch_out_dim, student_temp=cfg.student_temp,
                             warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                             warmup_teacher_patch_temp=cfg.warmup_teacher_temp,
                             teacher_patch_temp=cfg.teacher_patch_temp, warmup_steps=cfg.teacher_temp_warmup_steps,
                             lambda_cls=cfg.lambda_cls, lambda_mim=cfg.lambda_mim)
        self.patch_size = encoder.patch_size

    def _tokens(self, encoder, x, mask=None):
        """[CLS] (B, D) and token grid (B, N, D) at the configured stage."""
        f = encoder.forward_features(x, mask=mask, upto=self.cfg.heads_on)
        return f[f"{self.cfg.heads_on}_cls"][:, 0], rearrange(f[self.cfg.heads_on], "b h w d -> b (h w) d")

    def _token_mask(self, mask, grid_h):
        """Patch mask (B, H, W) -> mask of the tokens the heads read: a coarse token counts as masked when
        any of its patches is, since the student then cannot see all of what the teacher saw."""
        if mask.shape[1] != grid_h:
            mask = F.adaptive_max_pool2d(mask[:, None].float(), grid_h)[:, 0].bool()
        return mask.flatten(1)

    def forward(self, encoder, global_views, local_views, step: int):
        """global_views (B, 2, 3, G, G), local_views (B, n, 3, L, L) -> (L_iBOT, logs)."""
        B = global_views.shape[0]
        g = rearrange(global_views, "b v c h w -> (v b) c h w")  # view-major rows, as iBOTLoss expects
        grid = g.shape[-1] // self.patch_size
        gen = torch.Generator().manual_seed(step)  # masks are a function of the step: reproducible on resume
        masks = generate_masks(2 * B, grid, grid, self.cfg.mask_ratio, self.cfg.mask_ratio_var,
                               self.cfg.mask_probability, generator=gen).to(g.device)
        s_cls, s_tok = self._tokens(encoder, g, masks)
        s_cls_out, s_patch_out = self.heads(s_cls, s_tok)  # (2B, K), (2B, N, Kp)
        if local_views.shape[1]:  # local crops only take part in the [CLS] term
            l_cls, _ = self._tokens(encoder, rearrange(local_views, "b v c h w -> (v b) c h w"))
            s_cls_out = torch.cat([s_cls_out, self.heads.cls_head(l_cls)])
        with torch.no_grad():
            t_cls, t_tok = self._tokens(self.teacher["encoder"], g)
            t_cls_out, t_patch_out = self.teacher["heads"](t_cls, t_tok)
        token_grid = int(round(s_tok.shape[1] ** 0.5))
        out = self.loss(s_cls_out.float(), s_patch_out.float(), t_cls_out.float(), t_patch_out.float(),
                        self._token_mask(masks, token_grid), step)
        logs = {"ibot": out["loss"].detach(), "ibot_cls": out["cls"].detach(), "ibot_mim": out["mim"].detach(),
                "mask_ratio": masks.float().mean()}
        return out["loss"], logs

    @torch.no_grad()
    def update_teacher(self, encoder, step: int, total_steps: int) -> float:
        m = cosine_momentum(step, total_steps, base=self.cfg.momentum_base)
        ema_update_(self.teacher["encoder"], encoder, m)
        ema_update_(self.teacher["heads"], self.heads, m)
        return m
