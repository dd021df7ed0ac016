"""L_iBOT = L_[CLS] + L_MIM on the TC-AE encoder: the student is the encoder + heads, the teacher their EMA.

The heads, the teacher and the centering live here; the encoder stays owned by the autoencoder, so the
reconstruction and SSL losses share its weights and its single backward pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange

from tcae_ldm.losses.ibot import cosine_momentum, iBOTLoss
from tcae_ldm.losses.masking import generate_masks
from tcae_ldm.models.ema import ema_update_
from tcae_ldm.models.ibot import iBOTHeads
from tcae_ldm.utils.seeding import default_seed, seed_of


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
        mask_ratio: mean fraction of the heads' tokens masked in a masked global view.
        mask_ratio_var: the ratio is drawn uniformly in [ratio - var, ratio + var].
        mask_probability: fraction of global views that are masked at all.
        student_temp: student softmax temperature.
        teacher_temp: [CLS] teacher temperature after warm-up.
        teacher_patch_temp: patch teacher temperature after warm-up.
        warmup_teacher_temp: both teacher temperatures start here ...
        teacher_temp_warmup_steps: ... and reach their final value after this many steps.
        momentum_base: teacher EMA momentum, cosine schedule to 1 over training (iBOT: 0.996; 0.9995 at batch 256).
        freeze_last_layer_steps: first steps without an update of the heads' prototypes (iBOT: one epoch).
        lambda_cls: weight of L_CLS.
        lambda_mim: weight of L_MIM.
    """
    alpha: float = 1.0
    heads_on: Literal["fine", "coarse"] = "coarse"
    out_dim: int = 8192
    patch_out_dim: int = 8192
    shared_head: bool = True
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    mask_ratio: float = 0.3
    mask_ratio_var: float = 0.2
    mask_probability: float = 0.5
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 10000
    momentum_base: float = 0.996
    freeze_last_layer_steps: int = 0
    lambda_cls: float = 1.0
    lambda_mim: float = 1.0


torch.serialization.add_safe_globals([SSLConfig])


def draw_masks(cfg: SSLConfig, n: int, grid: int, step: int) -> torch.Tensor:
    """Block masks (n, grid, grid), a function of (seed, step, rank): reproducible on resume, different on every
    DDP rank (each rank holds other images). The seed is seed_everything's."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(seed_of(default_seed(None), step, rank))
    return generate_masks(n, grid, grid, cfg.mask_ratio, cfg.mask_ratio_var, cfg.mask_probability, generator=gen)


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

    def features(self, encoder, x, mask=None):
        """[CLS] (B, D) and tokens (B, N, D) at the configured stage, through the encoder's final norm there
        (iBOT's heads read the backbone's normed output; see TCAEEncoder.stage_norm)."""
        stage = self.cfg.heads_on
        f = encoder.forward_features(x, mask=mask, upto=stage)
        norm = encoder.stage_norm(stage)
        return norm(f[f"{stage}_cls"][:, 0]), norm(rearrange(f[stage], "b h w d -> b (h w) d"))

    def forward(self, encoder, global_views, local_views, step: int):
        """global_views (B, 2, 3, G, G), local_views (B, n, 3, L, L) -> (L_iBOT, logs)."""
        B = global_views.shape[0]
        g = rearrange(global_views, "b v c h w -> (v b) c h w")  # view-major rows, as iBOTLoss expects
        # Masks are drawn on the grid the heads read and cover whole tokens there, as iBOT does for its
        # hierarchical (Swin) backbone: every masked token is wholly hidden from the student.
        grid = g.shape[-1] // encoder.stage_stride(self.cfg.heads_on)
        masks = draw_masks(self.cfg, 2 * B, grid, step).to(g.device)                 # (2B, h, w)
        token_mask = masks.flatten(1)                                                 # (2B, N)
        s_cls, s_tok = self.features(encoder, g, masks)                               # (2B, D), (2B, N, D)
        if local_views.shape[1]:  # local crops take part in the [CLS] term only: one batched forward
            l_cls, _ = self.features(encoder, rearrange(local_views, "b v c h w -> (v b) c h w"))
            s_cls = torch.cat([s_cls, l_cls])                                         # (V*B, D)
        # Only the masked tokens enter L_MIM: the student's heads skip the others (same loss, same gradient).
        s_cls_out, s_patch_out = self.heads(s_cls, s_tok[token_mask])                # (V*B, K), (M, Kp)
        with torch.inference_mode():
            t_cls, t_tok = self.features(self.teacher["encoder"], g)
            t_cls_out, t_patch_out = self.teacher["heads"](t_cls, t_tok)              # (2B, K), (2B, N, Kp)
        out = self.loss(s_cls_out, s_patch_out, t_cls_out, t_patch_out, token_mask, step)  # fp32 inside
        logs = {"ibot": out["loss"].detach(), "ibot_cls": out["cls"].detach(), "ibot_mim": out["mim"].detach(),
                "mask_ratio": token_mask.float().mean()}
        return out["loss"], logs

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weight-normalised prototype layers of the student heads (what freeze_last_layer_steps holds)."""
        return [p for n, p in self.heads.named_parameters() if ".last_layer." in f".{n}"]

    def cancel_last_layer_grads(self, step: int) -> bool:
        """Drop the prototypes' gradients during the first freeze_last_layer_steps steps (iBOT/DINO's
        freeze_last_layer): with no gradient, the optimizer leaves them untouched. True while frozen."""
        if step >= self.cfg.freeze_last_layer_steps:
            return False
        for p in self.last_layer_parameters():
            p.grad = None
        return True

    @torch.no_grad()
    def update_teacher(self, encoder, step: int, total_steps: int) -> float:
        m = cosine_momentum(step, total_steps, base=self.cfg.momentum_base)
        ema_update_(self.teacher["encoder"], encoder, m)
        ema_update_(self.teacher["heads"], self.heads, m)
        return m

    @torch.no_grad()
    def init_teacher(self, encoder) -> None:
        """The teacher's encoder copy takes the student encoder's current weights (after init_from)."""
        self.teacher["encoder"].load_state_dict(encoder.state_dict())
