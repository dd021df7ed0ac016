"""Class-conditional DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") on timm layers.

Follows facebookresearch/DiT ``models.py``: adaLN-Zero blocks, one shared timestep + label embedding whose
sum conditions every block, a fixed 2-D sin-cos position embedding, and label dropout to a "null" class
(index ``num_classes``) for classifier-free guidance. Parameter counts and GMACs match the paper's Table 1
(see the table at the end of the presets section). The module and parameter names are DiT's own, so the
published checkpoints (``DiT-XL-2-256x256.pt``) load through ``dit_from_official`` (see the end of the file).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import Mlp, PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Attention
from torch.utils.checkpoint import checkpoint

POS_EMBED_LAYOUTS = ("timm", "dit")


def sincos_pos_embed(grid: int, dim: int, layout: str = "timm") -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos position table of a row-major token grid, frequencies
    10000^(-k / (dim / 4)). "timm": timm's order (sin y, sin x, cos y, cos x). "dit": DiT's (MAE's) order
    (sin x, cos x, sin y, cos y), in float64 then float32 as DiT computes it, so the published weights see
    the table they were trained with, bit for bit."""
    if layout == "timm":
        return build_sincos2d_pos_embed([grid, grid], dim=dim)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    halves = [torch.outer(pos.reshape(-1), omega) for pos in (xs, ys)]
    return torch.cat([f(h) for h in halves for f in (torch.sin, torch.cos)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample shift and scale (B, D) broadcast over tokens of x (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoid of (time_scale * t), then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        # The sinusoid's frequencies span periods 1 .. 10000, tuned for t in [0, 1000). Scaling t by 1000
        # lets a flow objective's t in [0, 1] use the same resolution; set 1.0 to feed raw DDPM steps.
        self.time_scale = time_scale

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding (B, dim) of (possibly fractional) timesteps t (B,)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t * self.time_scale, self.frequency_embedding_size)  # (B, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; in training drops them to the null class (index num_classes) for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0  # the null class row only exists when CFG is trained
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace a random fraction (or the ``force_drop_ids == 1`` entries) of labels by the null class."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)  # fused SDPA
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """Final adaLN-modulated norm and linear projection from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, class-conditional on a latent grid."""

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        grad_checkpointing: bool = False,
        time_scale: float = 1000.0,
        pos_embed_layout: str = "timm",
    ):
        """time_scale multiplies t before the sinusoid: 1000 for t in [0, 1] (both objectives here feed
        that), 1.0 for raw DDPM steps in [0, 1000) as in the original DiT.
        pos_embed_layout: the order of the sin-cos position embedding's four quarters: "timm" (sin y, sin x,
        cos y, cos x: timm's default, what this project's runs are trained with) or "dit" (sin x, cos x, sin y,
        cos y: DiT's / MAE's, which the published DiT weights expect)."""
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 for the 2-D sin-cos embedding")
        if pos_embed_layout not in POS_EMBED_LAYOUTS:
            raise ValueError(f"pos_embed_layout must be one of {POS_EMBED_LAYOUTS}, got {pos_embed_layout!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding: a buffer (not a parameter), rebuilt at construction, not checkpointed.
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(grid, hidden_size, pos_embed_layout).unsqueeze(0),
                             persistent=False)  # (1, N, D)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # Patch embedding as a linear layer (xavier on the flattened conv kernel), like the ViT/MAE recipe.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the model's output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W) latent."""
        g = self.input_size // self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=self.patch_size, q=self.patch_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) float timesteps, y (B,) long labels -> (B, C_out, H, W)."""
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return self.unpatchify(x)  # (B, C_out, H, W)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

_SIZES = {
    "T": dict(hidden_size=64, depth=2, num_heads=2),  # tiny: tests and the CPU demo
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_PRESETS: dict[str, dict] = {
    f"DiT-{size}/{p}": dict(patch_size=p, **cfg)
    for size, cfg in _SIZES.items()
    for p in ((1, 2) if size == "T" else (1, 2, 4, 8))
}


def create_dit(name: str, **overrides) -> DiT:
    """Build a preset by name; overrides (input_size, in_channels, learn_sigma, ...) go to DiT()."""
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
    return DiT(**{**DIT_PRESETS[name], **overrides})


# Measured with tcae_ldm.metrics.flops on 32x32x4 latents, learn_sigma=True, num_classes=1000, one image
# (params include the label table's null row; GMACs count the attention score matmuls):
#
#   preset      params (M)  paper    GMACs    paper      preset      GMACs    paper
#   DiT-S/2       32.87      33       6.056    6.06       DiT-S/4     1.413    1.41
#   DiT-B/2      130.32     130      23.005   23.01       DiT-B/4     5.565    5.56
#   DiT-L/2      457.84     458      80.698   80.71       DiT-L/4    19.696   19.70
#   DiT-XL/2     674.83     675     118.621  118.64       DiT-XL/4   29.044   29.05
#   DiT-S/8: 0.358 (paper 0.36), B/8: 1.418 (1.42), L/8: 5.011 (5.01), XL/8: 7.392 (7.39).
#
# Every /2 and /4 GMACs figure is within 0.1% of the paper (torch's counter counts only matmuls and convolutions,
# attention scores included). The original DiT's 675,129,632 parameters for XL/2 include its frozen
# pos-embed (294,912); here that is a buffer, which leaves 674,834,720.


#################################################################################
#                     Published facebookresearch/DiT checkpoints                #
#################################################################################

def dit_from_official(checkpoint: dict) -> tuple[str, dict, dict]:
    """(preset name, create_dit kwargs, state_dict) of a facebookresearch/DiT checkpoint: a released file
    (``DiT-XL-2-256x256.pt``: the EMA weights as a plain state_dict) or a checkpoint of its train.py (whose
    "ema" entry is used, as its sample.py does).

    The names of every weight are ours already (timm's PatchEmbed, Attention and Mlp, DiT's module names); the
    only difference is ``pos_embed``, a frozen parameter there and a buffer here: it is checked against our
    "dit"-layout embedding and dropped. Architecture numbers are read off the weights' shapes; the number of
    heads, which no shape carries, comes from the preset with that width, depth and patch size."""
    state = checkpoint.get("ema", checkpoint)
    if "x_embedder.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("not a facebookresearch/DiT checkpoint (no x_embedder.proj.weight / pos_embed)")
    hidden, in_channels, patch = state["x_embedder.proj.weight"].shape[:3]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = math.isqrt(state["pos_embed"].shape[1])
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    names = [n for n, p in DIT_PRESETS.items() if (p["hidden_size"], p["depth"], p["patch_size"]) == (hidden, depth, patch)]
    if not names:
        raise ValueError(f"no DiT preset has width {hidden}, depth {depth} and patch size {patch}")
    kwargs = dict(input_size=grid * patch, in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels,
                  num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,  # the last row is the null class
                  class_dropout_prob=0.1, pos_embed_layout="dit")
    ours = {k: v for k, v in state.items() if k != "pos_embed"}
    expected = sincos_pos_embed(grid, hidden, "dit")
    if not torch.allclose(state["pos_embed"].reshape(grid * grid, hidden).float(), expected, atol=1e-5):
        raise ValueError("the checkpoint's pos_embed is not DiT's 2-D sin-cos table: not a facebookresearch/DiT model")
    return names[0], kwargs, ours
