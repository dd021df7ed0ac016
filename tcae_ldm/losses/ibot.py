"""The iBOT objective: [CLS] self-distillation across views plus masked patch-token distillation (MIM), with
teacher centering, temperature warm-up and the teacher's momentum schedule (iBOT, Zhou et al., ICLR 2022;
DINO, Caron et al., ICCV 2021)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

#################################################################################
#                                    Loss                                       #
#################################################################################

class iBOTLoss(nn.Module):
    """iBOT objective: [CLS] distillation across views + masked patch-token distillation (MIM)."""

    def __init__(self, out_dim: int = 8192, patch_out_dim: int | None = None, n_global_views: int = 2,
                 student_temp: float = 0.1, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_patch_temp: float = 0.04, teacher_patch_temp: float = 0.07,
                 warmup_steps: int = 0, center_momentum: float = 0.9,
                 lambda_cls: float = 1.0, lambda_mim: float = 1.0):
        super().__init__()
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        self.n_global_views = n_global_views
        self.student_temp = student_temp
        self.cls_temps = (warmup_teacher_temp, teacher_temp)
        self.patch_temps = (warmup_teacher_patch_temp, teacher_patch_temp)
        self.warmup_steps = warmup_steps
        self.center_momentum = center_momentum
        self.lambda_cls, self.lambda_mim = lambda_cls, lambda_mim
        # Running means of the teacher's outputs; subtracting them keeps one prototype from winning
        # everything (collapse). Persistent, so a resumed run continues with the same centers.
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    def teacher_temps(self, step: int) -> tuple[float, float]:
        """Teacher temperatures ([CLS], patch) at `step`: linear warm-up, then constant."""
        t = 1.0 if self.warmup_steps <= 0 else min(max(step, 0) / self.warmup_steps, 1.0)
        lerp = lambda ab: ab[0] + (ab[1] - ab[0]) * t  # noqa: E731
        return lerp(self.cls_temps), lerp(self.patch_temps)

    def forward(self, student_cls: torch.Tensor, student_patch: torch.Tensor, teacher_cls: torch.Tensor,
                teacher_patch: torch.Tensor, masks: torch.Tensor, step: int,
                update_center: bool = True) -> dict[str, torch.Tensor]:
        """Rows are view-major: view v of image b is row v * B + b; global views come first.

        student_cls (V*B, K), student_patch (G*B, N, Kp) or only its masked tokens (M, Kp) in the order of
        masks.nonzero(), teacher_cls (G*B, K), teacher_patch (G*B, N, Kp), masks (G*B, N) or (G*B, H, W), True =
        masked in the student's input. Returns the weighted total "loss" and the unweighted "cls" and "mim"
        terms. Updates the centers afterwards unless told not to.
        """
        G = self.n_global_views
        B = teacher_cls.shape[0] // G
        V = student_cls.shape[0] // B if B else 0
        if B == 0 or teacher_cls.shape[0] != G * B or student_cls.shape[0] != V * B or V < G or V < 2:
            raise ValueError(f"expected teacher_cls with {G}*B rows and student_cls with V*B rows (V >= {G}, "
                             f"V >= 2); got {tuple(teacher_cls.shape)} and {tuple(student_cls.shape)}")
        masks = masks.flatten(1)
        img, tok = masks.nonzero(as_tuple=True)                                        # (M,), (M,)
        gathered = student_patch.dim() == 2
        if not (teacher_patch.shape[:2] == masks.shape and teacher_patch.shape[0] == G * B
                and (student_patch.shape == (len(img), teacher_patch.shape[-1]) if gathered
                     else student_patch.shape == teacher_patch.shape)):
            raise ValueError(f"patch shapes disagree: student {tuple(student_patch.shape)}, teacher "
                             f"{tuple(teacher_patch.shape)}, masks {tuple(masks.shape)} with {len(img)} masked, "
                             f"{G} global views x B={B}")
        # fp32 losses; the teacher's patch logits (every token, the largest tensor) stay in their dtype until
        # the masked ones are gathered, and the center reads them with fp32 accumulation.
        s_cls, s_patch = student_cls.float(), student_patch.float()
        t_cls, t_patch = teacher_cls.detach().float(), teacher_patch.detach()
        temp_cls, temp_patch = self.teacher_temps(step)

        # [CLS]: each global teacher view supervises every student view except its own.
        t = F.softmax((t_cls - self.center) / temp_cls, dim=-1).view(G, B, -1)        # (G, B, K)
        s = F.log_softmax(s_cls / self.student_temp, dim=-1).view(V, B, -1)            # (V, B, K)
        ce = -torch.einsum("gbk,vbk->gv", t, s) / B                                    # (G, V) mean over B
        pairs = ~torch.eye(G, V, dtype=torch.bool, device=ce.device)
        loss_cls = ce[pairs].mean()

        # MIM: same view, masked tokens only. Gathering them first skips the softmax over the rest.
        t = F.softmax((t_patch[img, tok].float() - self.center_patch[0]) / temp_patch, dim=-1)  # (M, Kp)
        s = F.log_softmax((s_patch if gathered else s_patch[img, tok]) / self.student_temp, dim=-1)  # (M, Kp)
        ce_tok = -(t * s).sum(-1)                                                      # (M,)
        # Mean over each image's masked tokens, then over EVERY image of the view (an unmasked image adds 0),
        # then over the G views: iBOT's per-view `mean()` and n_loss_terms. Averaging only over the masked
        # images would scale L_MIM up by 1 / mask_probability.
        count = masks.sum(1).to(ce_tok.dtype)                                          # (G*B,)
        loss_mim = (ce_tok / count[img]).sum() / (G * B)

        if update_center:
            self.update_center(t_cls, t_patch)
        loss = self.lambda_cls * loss_cls + self.lambda_mim * loss_mim
        return dict(loss=loss, cls=loss_cls, mim=loss_mim)

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the teacher's mean [CLS] and patch outputs, averaged over all ranks when distributed."""
        t_cls = teacher_cls.detach().float()                                           # (B, K)
        t_patch = teacher_patch.detach().mean(1, dtype=torch.float32)                  # (B, Kp)
        K = t_cls.shape[-1]
        # One collective for both sums and the row count (exact even if ranks hold different batch sizes).
        stats = torch.cat([t_cls.sum(0), t_patch.sum(0), t_cls.new_tensor([t_cls.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        n = stats[-1]
        m = self.center_momentum
        self.center.mul_(m).add_((stats[:K] / n).view_as(self.center), alpha=1 - m)
        self.center_patch.mul_(m).add_((stats[K:-1] / n).view_as(self.center_patch), alpha=1 - m)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from `base` at step 0 to `final` at `total_steps` (DINO/iBOT)."""
    if total_steps <= 0:
        return final
    t = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * t))
