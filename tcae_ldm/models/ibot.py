"""iBOT pieces for TC-AE's joint self-supervised training.

Projection heads, BEiT/iBOT block-wise masking, the iBOT objective ([CLS] self-distillation across views
plus masked patch-token distillation, with teacher centering and temperature warm-up) and the EMA teacher.
References: iBOT (Zhou et al., ICLR 2022), DINO (Caron et al., ICCV 2021), BEiT (Bao et al., ICLR 2022).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


#################################################################################
#                                    Heads                                      #
#################################################################################

class iBOTHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear: token features to K prototype logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # weight = g * v / ||v|| per output row; g is "original0", v is "original1".
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.initialize_weights(norm_last_layer)

    def initialize_weights(self, norm_last_layer: bool) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        wn = self.last_layer.parametrizations.weight
        nn.init.trunc_normal_(wn.original1, std=0.02)
        # Unit-length prototypes make the logits cosine similarities; freezing the length (DINO's
        # norm_last_layer) keeps early training stable.
        with torch.no_grad():
            wn.original0.fill_(1.0)
        wn.original0.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_dim)
        x = self.mlp(x)                    # (..., bottleneck_dim)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)          # (..., out_dim)


class iBOTHeads(nn.Module):
    """[CLS] and patch-token heads: one shared head (iBOT's default) or two separate heads."""

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: int | None = None, shared: bool = True,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        patch_out_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared and patch_out_dim != out_dim:
            raise ValueError(f"a shared head has one output size; got out_dim={out_dim} and "
                             f"patch_out_dim={patch_out_dim} (set shared=False to use two heads)")
        self.shared, self.out_dim, self.patch_out_dim = shared, out_dim, patch_out_dim
        kw = dict(hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers,
                  norm_last_layer=norm_last_layer)
        self.cls_head = iBOTHead(in_dim, out_dim, **kw)
        # Not registered at all when shared, so the checkpoint holds each weight once.
        self.patch_head = None if shared else iBOTHead(in_dim, patch_out_dim, **kw)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cls: (B, D), patches: (B, N, D)
        if self.patch_head is None:
            out = self.cls_head(torch.cat([cls[:, None], patches], dim=1))  # (B, 1 + N, K): one matmul
            return out[:, 0], out[:, 1:]                                      # (B, K), (B, N, K)
        return self.cls_head(cls), self.patch_head(patches)                  # (B, K), (B, N, Kp)


#################################################################################
#                            Block-wise masking                                 #
#################################################################################

def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    # lo > hi is allowed (as Python's random.uniform), which BEiT relies on near the end of a mask.
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi], both ends included."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


class BlockMaskGenerator:
    """BEiT/iBOT block-wise masking: random rectangles on an (H, W) token grid up to a target count."""

    def __init__(self, grid_h: int, grid_w: int, min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None, max_attempts: int = 10):
        self.height, self.width = grid_h, grid_w
        self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    def add_block(self, mask: torch.Tensor, max_patches: int, generator: torch.Generator | None = None) -> int:
        """Mask one rectangle adding at most `max_patches` new tokens; return how many (0: gave up)."""
        for _ in range(self.max_attempts):
            area = _uniform(self.min_num_patches, max_patches, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:
                continue
            top = _randint(0, self.height - h, generator)
            left = _randint(0, self.width - w, generator)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            # Overlap with earlier blocks is allowed, but the block must add something without overshooting.
            if 0 < new <= max_patches:
                block.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            max_patches = num_masking_patches - count
            if self.max_num_patches is not None:
                max_patches = min(max_patches, self.max_num_patches)
            delta = self.add_block(mask, max_patches, generator)
            if delta == 0:  # no block fits what is left: stop a few tokens short, as BEiT does
                break
            count += delta
        return mask  # (H, W)


def sample_mask_ratios(batch_size: int, ratio: float = 0.3, ratio_var: float = 0.2, mask_probability: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image masking ratio: U[ratio - var, ratio + var] clipped to [0, 1) with probability
    `mask_probability`, else 0 (iBOT's `--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`)."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    ratios = (ratio - ratio_var + 2.0 * ratio_var * u).clamp(0.0, math.nextafter(1.0, 0.0))
    masked = torch.rand(batch_size, generator=generator, dtype=torch.float64) < mask_probability
    return torch.where(masked, ratios, torch.zeros_like(ratios))  # (B,)


def generate_masks(batch_size: int, grid_h: int, grid_w: int, ratio: float = 0.3, ratio_var: float = 0.2,
                   mask_probability: float = 0.5, generator: torch.Generator | None = None,
                   min_num_patches: int = 4, min_aspect: float = 0.3) -> torch.Tensor:
    """Block-wise masks for a batch; True = masked token. Returns a bool tensor (B, H, W)."""
    ratios = sample_mask_ratios(batch_size, ratio, ratio_var, mask_probability, generator)
    make = BlockMaskGenerator(grid_h, grid_w, min_num_patches=min_num_patches, min_aspect=min_aspect)
    masks = torch.zeros(batch_size, grid_h, grid_w, dtype=torch.bool)
    for i, r in enumerate(ratios.tolist()):
        n = int(round(r * grid_h * grid_w))
        if n > 0:
            masks[i] = make(n, generator)
    return masks


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

        student_cls (V*B, K), student_patch (G*B, N, Kp), teacher_cls (G*B, K), teacher_patch (G*B, N, Kp),
        masks (G*B, N) or (G*B, H, W), True = masked in the student's input. Returns the weighted total
        "loss" and the unweighted "cls" and "mim" terms. Updates the centers afterwards unless told not to.
        """
        G = self.n_global_views
        B = teacher_cls.shape[0] // G
        V = student_cls.shape[0] // B if B else 0
        if B == 0 or teacher_cls.shape[0] != G * B or student_cls.shape[0] != V * B or V < G or V < 2:
            raise ValueError(f"expected teacher_cls with {G}*B rows and student_cls with V*B rows (V >= {G}, "
                             f"V >= 2); got {tuple(teacher_cls.shape)} and {tuple(student_cls.shape)}")
        masks = masks.flatten(1)
        if not (student_patch.shape == teacher_patch.shape and student_patch.shape[:2] == masks.shape
                and student_patch.shape[0] == G * B):
            raise ValueError(f"patch shapes disagree: student {tuple(student_patch.shape)}, teacher "
                             f"{tuple(teacher_patch.shape)}, masks {tuple(masks.shape)}, {G} global views x B={B}")
        s_cls, s_patch = student_cls.float(), student_patch.float()
        t_cls, t_patch = teacher_cls.detach().float(), teacher_patch.detach().float()
        temp_cls, temp_patch = self.teacher_temps(step)

        # [CLS]: each global teacher view supervises every student view except its own.
        t = F.softmax((t_cls - self.center) / temp_cls, dim=-1).view(G, B, -1)        # (G, B, K)
        s = F.log_softmax(s_cls / self.student_temp, dim=-1).view(V, B, -1)            # (V, B, K)
        ce = -torch.einsum("gbk,vbk->gv", t, s) / B                                    # (G, V) mean over B
        pairs = ~torch.eye(G, V, dtype=torch.bool, device=ce.device)
        loss_cls = ce[pairs].mean()

        # MIM: same view, masked tokens only. Gathering them first skips the softmax over the rest.
        img, tok = masks.nonzero(as_tuple=True)                                        # (M,), (M,)
        t = F.softmax((t_patch[img, tok] - self.center_patch[0]) / temp_patch, dim=-1)  # (M, Kp)
        s = F.log_softmax(s_patch[img, tok] / self.student_temp, dim=-1)               # (M, Kp)
        ce_tok = -(t * s).sum(-1)                                                      # (M,)
        # Mean over each image's masked tokens, then over the images that have any.
        count = masks.sum(1).to(ce_tok.dtype)                                          # (G*B,)
        n_images = (count > 0).sum().clamp(min=1)
        loss_mim = (ce_tok / count[img]).sum() / n_images

        if update_center:
            self.update_center(t_cls, t_patch)
        loss = self.lambda_cls * loss_cls + self.lambda_mim * loss_mim
        return dict(loss=loss, cls=loss_cls, mim=loss_mim)

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the teacher's mean [CLS] and patch outputs, averaged over all ranks when distributed."""
        t_cls, t_patch = teacher_cls.detach().float(), teacher_patch.detach().float()  # (B, K), (B, N, Kp)
        K = t_cls.shape[-1]
        # One collective for both sums and the row count (exact even if ranks hold different batch sizes).
        stats = torch.cat([t_cls.sum(0), t_patch.mean(1).sum(0), t_cls.new_tensor([t_cls.shape[0]])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        n = stats[-1]
        m = self.center_momentum
        self.center.mul_(m).add_((stats[:K] / n).view_as(self.center), alpha=1 - m)
        self.center_patch.mul_(m).add_((stats[K:-1] / n).view_as(self.center_patch), alpha=1 - m)


#################################################################################
#                                 EMA teacher                                   #
#################################################################################

def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from `base` at step 0 to `final` at `total_steps` (DINO/iBOT)."""
    if total_steps <= 0:
        return final
    t = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student` to be moved by `ema_update_` only."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student for trainable parameters; copy the rest."""
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters: "
                         f"{sorted(t_params.keys() ^ s_params.keys())[:5]}")
    # Frozen student tensors (e.g. the unit prototype lengths) are copied so float rounding cannot drift them.
    ema = [n for n, p in s_params.items() if p.requires_grad]
    frozen = [n for n, p in s_params.items() if not p.requires_grad]
    if ema:
        tp, sp = [t_params[n] for n in ema], [s_params[n].detach() for n in ema]
        torch._foreach_mul_(tp, momentum)
        torch._foreach_add_(tp, sp, alpha=1.0 - momentum)
    for n in frozen:
        t_params[n].copy_(s_params[n])
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
