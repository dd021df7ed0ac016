"""TC-AE: a ViT autoencoder with staged token compression.

Encoder: patchify (p) -> M ViT blocks on the fine grid -> intermediate bottleneck (two convs, tokens / 4)
-> N ViT blocks on the coarse grid -> final bottleneck (pixel-unshuffle + MLP) -> z (B, c, h, w).
The decoder mirrors it. With ``staged=False`` all M + N blocks run on the fine grid and one bottleneck
goes straight to the latent grid (the paper's "vanilla ViT" baseline, same latent shape).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import is_accelerate_available
from diffusers.utils.accelerate_utils import apply_forward_hook
from einops import rearrange
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.pos_embed_sincos import freq_bands, ndgrid
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

#################################################################################
#                         Geometry: who compresses by how much                  #
#################################################################################

def compression_plan(image_size: int, patch_size: int, latent_size: int, staged: bool) -> tuple[int, int, int]:
    """Return (fine grid, intermediate stride, final stride) or raise naming the numbers that clash."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
    grid = image_size // patch_size
    if grid % latent_size:
        raise ValueError(
            f"a {grid}x{grid} token grid (image_size={image_size} / patch_size={patch_size}) cannot be "
            f"compressed to a {latent_size}x{latent_size} latent: {grid} is not a multiple of {latent_size}")
    ratio = grid // latent_size
    if ratio & (ratio - 1):
        raise ValueError(
            f"token grid {grid} / latent grid {latent_size} = {ratio} is not a power of 2; the bottlenecks "
            f"compress by factors of 2 per side")
    inter = min(2, ratio) if staged else 1  # the paper's stage cut: 4x fewer tokens when the grid allows
    return grid, inter, ratio // inter


def _check_grid(h: int, w: int, stride: int, where: str) -> None:
    if h % stride or w % stride:
        raise ValueError(f"{where}: a {h}x{w} token grid is not divisible by the stride {stride}")


#################################################################################
#                               Embedding layers                                #
#################################################################################

def sincos2d(ys: torch.Tensor, xs: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(len(ys) * len(xs), dim) sin-cos embedding of the grid ys x xs (row-major), at any real coordinates;
    the layout of timm's build_sincos2d_pos_embed ([sin y, sin x, cos y, cos x]), equal to it bit for bit at
    integer coordinates."""
    bands = freq_bands(dim // 4, temperature=temperature, step=1, device=ys.device)  # (dim/4,)
    grid = torch.stack(ndgrid(ys, xs)).flatten(1).transpose(0, 1)                  # (h*w, 2)
    pos = grid.unsqueeze(-1) * bands.unsqueeze(0)                                   # (h*w, 2, dim/4)
    return torch.stack([torch.sin(pos), torch.cos(pos)], dim=1).flatten(1)          # (h*w, dim)


class PosEmbed2d(nn.Module):
    """Absolute 2-D position embedding, fixed sin-cos or learned, for a table of grid x grid positions.

    A token grid of another size spans the same range as the table, at finer or coarser spacing (iBOT / DINO's
    interpolate_pos_encoding): an iBOT crop is embedded as a whole field of view, as the full image is, rather
    than as the table's top-left corner. Sin-cos is evaluated at the exact coordinates that a bicubic resize of
    its table would sample; a learned table is resized bicubically (no antialiasing, as the reference).
    """

    def __init__(self, dim: int, grid: int, kind: str = "sincos"):
        super().__init__()
        if kind not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {kind!r}")
        self.dim, self.grid, self.kind = dim, grid, kind
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, grid * grid, dim))
            trunc_normal_(self.weight, std=0.02)

    def coords(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Table coordinates (0 .. grid - 1) of n tokens along one axis: the sample points of an
        align_corners=False resize from grid to n, which are 0, 1, ..., grid - 1 when n == grid."""
        return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (self.grid / n) - 0.5

    def forward(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.kind == "sincos":
            pe = sincos2d(self.coords(h, device), self.coords(w, device), self.dim)  # (h*w, D)
            return pe.to(dtype).unsqueeze(0)
        if (h, w) == (self.grid, self.grid):
            return self.weight.to(dtype)
        # The reference passes scale_factor = (n + 0.1) / grid to dodge a rounding of the output size; the
        # size itself gives the exact sample points.
        return resample_abs_pos_embed(self.weight, [h, w], [self.grid, self.grid], num_prefix_tokens=0,
                                      antialias=False).to(dtype)


#################################################################################
#                                  Bottlenecks                                  #
#################################################################################

class TokenDownsample(nn.Module):
    """Intermediate bottleneck: a stride-s conv then a 3x3 conv on the token grid (tokens / s^2)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Conv2d(dim, dim, kernel_size=stride, stride=stride)
        self.mix = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x):  # (B, H, W, D) -> (B, H/s, W/s, D)
        _check_grid(x.shape[1], x.shape[2], self.stride, "intermediate bottleneck")
        x = rearrange(self.norm(x), "b h w d -> b d h w")
        x = self.mix(F.gelu(self.reduce(x)))
        return rearrange(x, "b d h w -> b h w d")


class TokenUpsample(nn.Module):
    """Decoder twin of TokenDownsample: a 3x3 conv then a stride-s transposed conv (tokens * s^2)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.expand = nn.ConvTranspose2d(dim, dim, kernel_size=stride, stride=stride)

    def forward(self, x):  # (B, h, w, D) -> (B, h*s, w*s, D)
        x = rearrange(self.norm(x), "b h w d -> b d h w")
        x = self.expand(F.gelu(self.mix(x)))
        return rearrange(x, "b d h w -> b h w d")


class LatentProjection(nn.Module):
    """Final bottleneck: pixel-unshuffle s x s, then an MLP to the c latent channels."""

    def __init__(self, dim: int, stride: int, latent_channels: int):
        super().__init__()
        self.stride = stride
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim * stride * stride, hidden_features=dim, out_features=latent_channels)

    def forward(self, x):  # (B, H, W, D) -> (B, c, H/s, W/s)
        _check_grid(x.shape[1], x.shape[2], self.stride, "final bottleneck")
        s = self.stride
        x = rearrange(self.norm(x), "b (h s1) (w s2) d -> b h w (s1 s2 d)", s1=s, s2=s)
        return rearrange(self.mlp(x), "b h w c -> b c h w")


class LatentExpansion(nn.Module):
    """Decoder twin of LatentProjection: an MLP from c channels, then pixel-shuffle s x s."""

    def __init__(self, dim: int, stride: int, latent_channels: int):
        super().__init__()
        self.stride = stride
        self.mlp = Mlp(latent_channels, hidden_features=dim, out_features=dim * stride * stride)

    def forward(self, z):  # (B, c, h, w) -> (B, h*s, w*s, D)
        s = self.stride
        x = self.mlp(rearrange(z, "b c h w -> b h w c"))
        return rearrange(x, "b h w (s1 s2 d) -> b (h s1) (w s2) d", s1=s, s2=s)


#################################################################################
#                                 ViT stages                                    #
#################################################################################

def checkpoint_block(block: nn.Module, *args):
    """Recompute block(*args) in backward: the default of diffusers' enable_gradient_checkpointing (module, *args)."""
    return checkpoint(block.__call__, *args, use_reentrant=False)


class ViTStage(nn.Module):
    """A stack of pre-norm ViT blocks on a token grid, with its own position embedding."""

    def __init__(self, dim, depth, num_heads, mlp_ratio, qk_norm, grid, pos_embed, grad_checkpointing=False):
        super().__init__()
        self.pos = PosEmbed2d(dim, grid, pos_embed)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, qk_norm=qk_norm) for _ in range(depth)])
        self.gradient_checkpointing = grad_checkpointing  # diffusers' name: enable_gradient_checkpointing() sets it
        self._gradient_checkpointing_func = checkpoint_block  # ... and this, to the function it is given

    def forward(self, x, prefix=None):
        """x: (B, H, W, D) grid; prefix: (B, P, D) tokens (e.g. [CLS]) that attend but have no position."""
        B, H, W, D = x.shape
        # contiguous: a grid that arrives as a permuted view (timm's NHWC patch embedding of an NCHW convolution)
        # would carry its D-major memory layout through every block, a copy in each LayerNorm
        x = rearrange(x, "b h w d -> b (h w) d").contiguous() + self.pos(H, W, x.dtype, x.device)  # (B, HW, D)
        P = 0 if prefix is None else prefix.shape[1]
        if P:
            x = torch.cat([prefix, x], dim=1)  # (B, P + HW, D)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(blk, x)
            else:
                x = blk(x)
        out = rearrange(x[:, P:], "b (h w) d -> b h w d", h=H, w=W)
        return out, (x[:, :P] if P else None)


#################################################################################
#                               Encoder / Decoder                               #
#################################################################################

class TCAEEncoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, c, h, w), exposing the fine and coarse token grids on the way."""

    def __init__(self, grid, patch_size, dim, num_heads, depth_fine, depth_coarse, mlp_ratio, qk_norm,
                 pos_embed, inter_stride, final_stride, latent_channels, staged, cls_token, grad_checkpointing):
        super().__init__()
        self.patch_size, self.staged = patch_size, staged
        # img_size None: no size check inside (forward_features checks divisibility); timm's check formats the size
        # into its message, which makes torch.compile(dynamic=True) specialise, and so recompile, per image size
        self.patch_embed = PatchEmbed(None, patch_size, 3, dim, flatten=False, output_fmt="NHWC",
                                      strict_img_size=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))  # replaces masked patches (iBOT MIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        if staged:
            self.fine = ViTStage(dim, depth_fine, num_heads, mlp_ratio, qk_norm, grid, pos_embed, grad_checkpointing)
            self.down = TokenDownsample(dim, inter_stride)
            self.coarse = ViTStage(dim, depth_coarse, num_heads, mlp_ratio, qk_norm, grid // inter_stride,
                                   pos_embed)
        else:  # vanilla ViT: every block on the fine grid, no intermediate bottleneck
            self.fine = ViTStage(dim, depth_fine + depth_coarse, num_heads, mlp_ratio, qk_norm, grid, pos_embed,
                                 grad_checkpointing)
            self.down = self.coarse = None
        self.to_latent = LatentProjection(dim, final_stride, latent_channels)

    def stage_stride(self, stage: str) -> int:
        """Pixels per token side on the 'fine' or 'coarse' grid."""
        return self.patch_size * (self.down.stride if stage == "coarse" and self.staged else 1)

    def stage_norm(self, stage: str) -> nn.LayerNorm:
        """The LayerNorm the encoder applies next to the tokens of a stage ('coarse': the final bottleneck's,
        'fine': the intermediate one's): the encoder's own final norm for features read at that stage, as a
        ViT's heads read the output of its final norm."""
        return self.down.norm if stage == "fine" and self.staged else self.to_latent.norm

    def forward_features(self, x, mask=None, upto: str = "latent") -> dict:
        """Run the encoder up to 'fine', 'coarse' or 'latent'; returns the grids and [CLS] seen so far.

        mask: (B, H/q, W/q) bool, True where the patches under a cell are replaced by the learned mask token;
        q is the patch size or a multiple of it (a mask drawn on the coarse grid covers whole coarse tokens,
        as iBOT expands its Swin masks from the last stage's grid to the patches).
        """
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"image of {x.shape[-2]}x{x.shape[-1]} is not divisible by patch_size={self.patch_size}")
        x = self.patch_embed(x)  # (B, H1, W1, D)
        if mask is not None:
            fh, fw = x.shape[1] // mask.shape[1], x.shape[2] // mask.shape[2]
            if (mask.shape[1] * fh, mask.shape[2] * fw) != tuple(x.shape[1:3]):
                raise ValueError(f"a {mask.shape[1]}x{mask.shape[2]} mask does not tile the {x.shape[1]}x"
                                 f"{x.shape[2]} patch grid")
            mask = mask.repeat_interleave(fh, 1).repeat_interleave(fw, 2)  # (B, H1, W1)
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        # repeat, not expand: a view of a parameter taken under no_grad still says requires_grad (without a
        # grad_fn), which breaks torch's FLOP counter when it is passed to a module
        cls = None if self.cls_token is None else self.cls_token.repeat(x.shape[0], 1, 1)
        out = {}
        x, cls = self.fine(x, cls)  # (B, H1, W1, D)
        out["fine"], out["fine_cls"] = x, cls
        if upto == "fine":
            return out
        if self.staged:
            x, cls = self.coarse(self.down(x), cls)  # (B, H1/s, W1/s, D)
        out["coarse"], out["coarse_cls"] = x, cls
        if upto == "coarse":
            return out
        out["latent"] = self.to_latent(x)  # (B, c, h, w); [CLS] is dropped here
        return out

    def forward(self, x):
        return self.forward_features(x)["latent"]


class TCAEDecoder(nn.Module):
    """Latent (B, c, h, w) -> image (B, 3, H, W): the encoder's mirror."""

    def __init__(self, grid, patch_size, dim, num_heads, depth_fine, depth_coarse, mlp_ratio, qk_norm,
                 pos_embed, inter_stride, final_stride, latent_channels, staged, grad_checkpointing):
        super().__init__()
        self.patch_size = patch_size
        self.from_latent = LatentExpansion(dim, final_stride, latent_channels)
        if staged:
            self.coarse = ViTStage(dim, depth_coarse, num_heads, mlp_ratio, qk_norm, grid // inter_stride,
                                   pos_embed)
            self.up = TokenUpsample(dim, inter_stride)
            self.fine = ViTStage(dim, depth_fine, num_heads, mlp_ratio, qk_norm, grid, pos_embed, grad_checkpointing)
        else:
            self.coarse = self.up = None
            self.fine = ViTStage(dim, depth_fine + depth_coarse, num_heads, mlp_ratio, qk_norm, grid, pos_embed,
                                 grad_checkpointing)
        self.norm = nn.LayerNorm(dim)
        self.to_pixels = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, z):
        x = self.from_latent(z)  # (B, h*s2, w*s2, D)
        if self.coarse is not None:
            x, _ = self.coarse(x)
            x = self.up(x)  # (B, H1, W1, D)
        x, _ = self.fine(x)
        x = self.to_pixels(self.norm(x))  # (B, H1, W1, p*p*3)
        p = self.patch_size
        return rearrange(x, "b h w (p1 p2 c) -> b c (h p1) (w p2)", p1=p, p2=p, c=3)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight whose gradient norms set the adaptive GAN weight."""
        return self.to_pixels.weight


#################################################################################
#                                 The autoencoder                               #
#################################################################################

def scalar_latent_scale(mean: list[float], std: list[float]) -> tuple[float, float]:
    """(shift_factor, scaling_factor) such that (z - shift) * scale has mean 0 and variance 1 over all channels
    together (the pooled statistics of the per-channel mean / std): one scalar pair for diffusers' pipelines, which
    normalise latents with `vae.config.scaling_factor` / `shift_factor` rather than per channel."""
    shift = math.fsum(mean) / len(mean)  # plain floats: also under a meta-device context (FLOP counting)
    pooled_var = math.fsum(sd * sd + (m - shift) ** 2 for m, sd in zip(mean, std)) / len(mean)  # total variance
    return shift, 1.0 / math.sqrt(pooled_var)


class AutoencoderTC(ModelMixin, ConfigMixin):
    """TC-AE as a diffusers model: x in [-1, 1] (B, 3, H, W) <-> z of shape (B, c, h, w).

    `encode(x).latent` and `decode(z).sample` (tuples with return_dict=False), `save_pretrained` /
    `from_pretrained` (config.json + diffusion_pytorch_model.safetensors), as diffusers' AutoencoderDC. Latents are
    raw; `latents_mean` / `latents_std` (per channel, set once a latent cache has measured them) normalise them for
    a diffusion model: (z - mean) / std. `scaling_factor` / `shift_factor`, what diffusers' pipelines read, are their
    pooled scalar version (scalar_latent_scale; 1 and 0 without statistics). Training code calls the tensor modules
    `encoder` and `decoder` (what torch.compile, the FLOP counter and iBOT's `encoder.forward_features` see).
    `diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads a saved folder: config.json maps
    AutoModel to tcae.AutoencoderTC (its `auto_map`) and save_pretrained writes that tcae.py, a one-line import.
    """

    _auto_class = "AutoModel"  # save_pretrained writes config.json's auto_map (module "tcae": this file's name)

    # grad_checkpointing recomputes the fine (high-token) stages in backward; diffusers'
    # enable_gradient_checkpointing() recomputes every ViT stage
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, image_size: int = 256, patch_size: int = 8, latent_size: int = 8,
                 latent_channels: int = 128, width: int = 768, num_heads: int = 12, depth_fine: int = 6,
                 depth_coarse: int = 6, mlp_ratio: float = 4.0, qk_norm: bool = True, pos_embed: str = "sincos",
                 staged: bool = True, cls_token: bool = False, grad_checkpointing: bool = False,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        for key, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if stats is not None and len(stats) != latent_channels:
                raise ValueError(f"{key} has {len(stats)} values for {latent_channels} latent channels")
        grid, inter, final = compression_plan(image_size, patch_size, latent_size, staged)
        self.image_size, self.patch_size, self.latent_size = image_size, patch_size, latent_size
        self.latent_channels, self.staged, self.grid, self.width = latent_channels, staged, grid, width
        self.strides = (inter, final)
        common = dict(grid=grid, patch_size=patch_size, dim=width, num_heads=num_heads, depth_fine=depth_fine,
                      depth_coarse=depth_coarse, mlp_ratio=mlp_ratio, qk_norm=qk_norm, pos_embed=pos_embed,
                      inter_stride=inter, final_stride=final, latent_channels=latent_channels, staged=staged,
                      grad_checkpointing=grad_checkpointing)
        self.encoder = TCAEEncoder(cls_token=cls_token, **common)
        self.decoder = TCAEDecoder(**common)
        self.initialize_weights()
        if latents_mean is not None and latents_std is not None:
            self.set_latent_stats(latents_mean, latents_std)
        elif scaling_factor is None or shift_factor is None:
            self.register_to_config(scaling_factor=1.0 if scaling_factor is None else scaling_factor,
                                    shift_factor=0.0 if shift_factor is None else shift_factor)

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        """Record a latent cache's per-channel statistics and the scalar pair derived from them (scalar_latent_scale),
        so that the two never disagree."""
        shift, scale = scalar_latent_scale(mean, std)
        self.register_to_config(latents_mean=list(mean), latents_std=list(std), scaling_factor=scale,
                                shift_factor=shift)

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        trunc_normal_(self.encoder.mask_token, std=0.02)
        if self.encoder.cls_token is not None:
            trunc_normal_(self.encoder.cls_token, std=0.02)

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(c, h, w) of the latent for a square image of this size."""
        size = image_size or self.image_size
        return self.latent_channels, size * self.latent_size // self.image_size, size * self.latent_size // self.image_size

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[torch.Tensor]:
        """(B, 3, H, W) -> EncoderOutput(latent=(B, c, h, w)), or (latent,) with return_dict=False."""
        z = self.encoder(x)
        return EncoderOutput(latent=z) if return_dict else (z,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """(B, c, h, w) -> DecoderOutput(sample=(B, 3, H, W)), or (sample,) with return_dict=False."""
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """The reconstruction of sample (B, 3, H, W), as AutoencoderDC's forward."""
        x = self.decoder(self.encoder(sample))
        return DecoderOutput(sample=x) if return_dict else (x,)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight whose gradient norms set the adaptive GAN weight."""
        return self.decoder.last_layer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained; a folder in the layout of earlier versions gets the command that converts it."""
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(folder, "model.safetensors")) and not os.path.isfile(
                os.path.join(folder, "diffusion_pytorch_model.safetensors")):
            raise OSError(f"{folder} holds a TC-AE in the layout of earlier versions (model.safetensors): convert it "
                          f"with `tcae-ldm export --ckpt {folder} --out NEW_FOLDER` (load_autoencoder('tcae', ...) "
                          f"also reads it as it is)")
        # diffusers defaults low_cpu_mem_usage to True and warns on every load when accelerate is missing
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # auto_map only locates the class for AutoModel: not a constructor argument, which diffusers would warn about
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save_pretrained, plus tcae.py: the module that config.json's auto_map names, so that
        `AutoModel.from_pretrained(folder, trust_remote_code=True)` finds this class (in the installed package)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        with open(os.path.join(save_directory, "tcae.py"), "w") as f:
            f.write(AUTO_MAP_MODULE)


# The module a folder's auto_map points to: AutoModel imports it (trust_remote_code=True) and takes AutoencoderTC.
AUTO_MAP_MODULE = ('"""AutoencoderTC for diffusers.AutoModel (config.json auto_map); the class is the installed '
                   'tcae-ldm package\'s."""\nfrom tcae_ldm.models.tcae import AutoencoderTC  # noqa: F401\n')

TCAE = AutoencoderTC  # the name of earlier versions (checkpoints and configs record presets, not this name)


#################################################################################
#                                   Presets                                     #
#################################################################################

# Widths and depths per size. "B" is the paper-scale model (ViT-B width; encode + decode <= 164 GMACs at
# 256x256 with p=8); "S" is the CPU demo's; "T" is for tests.
TCAE_SIZES = {
    "T": dict(width=32, num_heads=2, depth_fine=1, depth_coarse=1, mlp_ratio=2.0),
    "S": dict(width=128, num_heads=4, depth_fine=2, depth_coarse=2),
    "B": dict(width=768, num_heads=12, depth_fine=8, depth_coarse=4),
}

TCAE_PRESETS = {
    f"TC-AE-{size}/p{p}-c{c}": dict(TCAE_SIZES[size], patch_size=p, latent_channels=c)
    for size in TCAE_SIZES for p in (4, 8, 16, 32) for c in (16, 32, 64, 128, 256)
}


def create_tcae(name: str, **overrides) -> AutoencoderTC:
    """Build a TC-AE preset by name; keyword arguments override any AutoencoderTC argument."""
    if name not in TCAE_PRESETS:
        raise KeyError(f"unknown TC-AE preset {name!r}; known sizes {sorted(TCAE_SIZES)}, "
                       f"patch sizes 4/8/16/32, channels 16/32/64/128/256, e.g. 'TC-AE-B/p8-c128'")
    return AutoencoderTC(**{**TCAE_PRESETS[name], **overrides})
