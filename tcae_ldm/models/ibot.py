"""iBOT's projection heads (Zhou et al., ICLR 2022; DINO's head, Caron et al., ICCV 2021): token features to
prototype logits. The objective that trains them, the masks and the teacher live in tcae_ldm.losses."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#################################################################################
#                                    Layers                                     #
#################################################################################

class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose weight is g * v / ||v|| per output row (weight normalisation).

    Written out rather than through torch's parametrization, whose generated class cannot be pickled: a module
    holding one could not be sent to `ddp_spawn` processes. Same parameters, shapes and order as
    `torch.nn.utils.parametrizations.weight_norm`, whose checkpoint keys still load.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))                 # per-row length
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))      # direction
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Keys written by torch's weight_norm parametrization: original0 = g, original1 = v.
        for old, new in (("parametrizations.weight.original0", "weight_g"),
                         ("parametrizations.weight.original1", "weight_v")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.initialize_weights(norm_last_layer)

    def initialize_weights(self, norm_last_layer: bool) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Unit-length prototypes make the logits cosine similarities; freezing the length (DINO's
        # norm_last_layer) keeps early training stable.
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

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
        # cls: (B, D); patches: (B, N, D), or any (..., D) such as the masked tokens only (M, D)
        if self.patch_head is None:
            flat = patches.reshape(-1, patches.shape[-1])
            out = self.cls_head(torch.cat([cls, flat]))                         # (B + B*N, K): one matmul
            return out[:cls.shape[0]], out[cls.shape[0]:].view(*patches.shape[:-1], out.shape[-1])  # (B, K), (..., K)
        return self.cls_head(cls), self.patch_head(patches)                      # (B, K), (..., Kp)
