"""Training compute of a run: GMACs per training image counted once on the meta device, summed step by step.

Each training module builds a twin of itself on the meta device (same hyper-parameters, no weights, no memory) and
counts one training step of one image there with torch.utils.flop_counter (tcae_ldm.metrics.flops):

- AutoencoderModule: the reconstruction step as training_losses runs it (autoencoder forward + backward, or, in
  decoder finetuning, the frozen encoder's forward and the decoder's forward + backward; LPIPS forward + backward
  to the reconstruction; the critic's generator term, the adaptive weight's two gradients and the critic's own
  hinge loss once step >= disc_start), plus, with iBOT, the student on the masked global views and on the local
  views (forward + backward), the teacher's forward on the global views, and the student heads (forward +
  backward, [CLS] tokens and the expected number of masked tokens) and teacher heads (forward). The cost is
  counted once per phase (before / after disc_start).
- DiffusionModule: DiT forward + backward on one latent (the objective around it is elementwise).

Not counted: optimizer steps, EMA and teacher updates, gradient clipping and the losses' own arithmetic (elementwise,
but for the [CLS] cross-entropy's einsum over view pairs: 2 x 2 x views x prototypes MACs per image, about 1e-5 of
the paper's step): all well under 1% of a step. The cumulative total is per global batch (this rank's images x world
size) and lives in the module's checkpoint, so a resumed run continues it (tcae_ldm.metrics.convergence documents the
logged columns).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import lightning as L
import torch
from einops import rearrange

from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.metrics.flops import count_call_gmacs
from tcae_ldm.models.dit import create_dit

META = torch.device("meta")


def log_value(total: float) -> torch.Tensor:
    """A cumulative total as Lightning should log it: float64, since a float becomes float32, whose 7 digits
    would round a total of 1e12 GMACs by 1e5."""
    return torch.tensor(total, dtype=torch.float64)


def meta_twin(module: L.LightningModule, **overrides) -> L.LightningModule:
    """The module rebuilt from its hyper-parameters on the meta device (overrides replace some of them); entries
    that are no constructor argument (LightningCLI's _class_path) are left out."""
    names = inspect.signature(type(module)).parameters
    with META:
        twin = type(module)(**{k: v for k, v in {**module.hparams, **overrides}.items() if k in names})
    return twin.train()


def meta_batch(batch: dict) -> dict:
    """One example of a batch as meta tensors (the tensors' shapes with batch size 1); other entries dropped."""
    return {k: torch.empty(1, *v.shape[1:], dtype=v.dtype, device=META) for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.dim() > 0}


@contextlib.contextmanager
def _ssl_off(module):
    ssl, module.ssl = module.ssl, None
    try:
        yield
    finally:
        module.ssl = ssl


def autoencoder_twin(module: L.LightningModule) -> L.LightningModule:
    """An AutoencoderModule's meta twin: no EMA (it is not trained), no compilation, no metric networks, a random
    LPIPS trunk (same cost, no weight file). The loss and iBOT configs are the module's own objects (LightningCLI
    records them in the hyper-parameters as plain mappings)."""
    loss: ReconstructionLossConfig = dataclasses.replace(module.loss.cfg, lpips_trunk="random")
    ssl = module.ssl.cfg if module.ssl is not None else None
    twin = meta_twin(module, loss=loss, ssl=ssl, ema_decay=None, compile=False, init_from=None, metrics_lpips=None,
                     metrics_fid=None)
    twin.loss.load_lpips()  # it follows its inputs to the meta device
    return twin


def reconstruction_gmacs(twin, batch: dict, step: int) -> float:
    """GMACs of the reconstruction half of a training step at `step` (the critic's terms when it is active)."""
    def run():
        with _ssl_off(twin):
            total, _, _ = twin.training_losses(batch, step)
            total.backward()
    return count_call_gmacs(run)


def ibot_gmacs(twin, batch: dict) -> float:
    """GMACs of iBOT's part of a step for the views in `batch` (one image's 2 global and n local crops)."""
    ssl, enc = twin.ssl, twin.net.encoder
    g = rearrange(batch["global"], "b v c h w -> (v b) c h w")
    loc = rearrange(batch["local"], "b v c h w -> (v b) c h w")
    grid = g.shape[-1] // enc.stage_stride(ssl.cfg.heads_on)
    masks = torch.zeros(g.shape[0], grid, grid, dtype=torch.bool, device=META)  # masking does not change the cost

    def student():
        cls, tok = ssl.features(enc, g, masks)
        out = cls.sum() + tok.sum()
        if loc.shape[0]:
            out = out + ssl.features(enc, loc)[0].sum()
        out.backward()

    def teacher():
        with torch.no_grad():
            ssl.features(ssl.teacher["encoder"], g)

    width = twin.net.width
    views = g.shape[0] + loc.shape[0]
    cls = torch.empty(views, width, device=META, requires_grad=True)
    t_cls, t_tok = torch.empty(g.shape[0], width, device=META), torch.empty(g.shape[0], grid * grid, width, device=META)

    def heads(n_tokens: int):
        def run():
            s_c, s_p = ssl.heads(cls, torch.empty(n_tokens, width, device=META, requires_grad=True))
            (s_c.sum() + s_p.sum()).backward()
            with torch.no_grad():
                ssl.teacher["heads"](t_cls, t_tok)
        return count_call_gmacs(run)

    # The heads read [CLS] and the masked tokens only; their cost is linear in the number of masked tokens, whose
    # expectation is (global views) x grid^2 x mask_probability x mask_ratio.
    n_all = g.shape[0] * grid * grid
    expected = n_all * ssl.cfg.mask_probability * ssl.cfg.mask_ratio
    h0, h1 = heads(0), heads(n_all)
    return count_call_gmacs(student) + count_call_gmacs(teacher) + h0 + (h1 - h0) * expected / n_all


class AutoencoderStepCost:
    """GMACs per training image of an AutoencoderModule, counted on its meta twin at the first step of each phase."""

    def __init__(self, module: L.LightningModule):
        self.module, self.twin, self.shapes, self.per_image = module, None, None, {}

    def __call__(self, batch: dict, step: int) -> float:
        gan = self.module.loss.gan_active(step)
        if gan not in self.per_image:
            if self.twin is None:
                self.twin, self.shapes = autoencoder_twin(self.module), meta_batch(batch)
            cost = reconstruction_gmacs(self.twin, self.shapes, step)
            if self.twin.ssl is not None:
                cost += ibot_gmacs(self.twin, self.shapes)
            self.per_image[gan] = cost
        return self.per_image[gan]


def dit_step_gmacs(module: L.LightningModule) -> float:
    """GMACs per training latent of a DiffusionModule: DiT forward + backward on one latent, the DiT built on the meta
    device as the module builds it (the objective around it is elementwise)."""
    hp = module.hparams
    c, h, w = hp.latent_shape
    with META:
        dit = create_dit(hp.dit, **{**(hp.dit_args or {}), "input_size": h, "in_channels": c,
                                    "num_classes": hp.num_classes}).train()
    x, t = torch.empty(1, c, h, w, device=META), torch.empty(1, device=META)
    y = torch.zeros(1, dtype=torch.long, device=META)
    return count_call_gmacs(lambda: dit(x, t, y).sum().backward())
