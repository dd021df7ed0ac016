"""DiffusionModule: a class-conditional DiT trained on a latent cache, with EMA, sampling and CFG.

The DiT's input size, channels and number of classes are read from the LatentDataModule in
configure_model() and recorded in the hyper-parameters, so configs never repeat them and a checkpoint
rebuilds its own DiT. Training randomness (noise, t, label dropout) is drawn from a generator seeded by
(seed, rank, step, micro-batch) and the data stream is checkpointed, so resuming from any step replays
exactly what an uninterrupted run does.
The autoencoder that decodes samples is loaded lazily and is never part of the checkpoint.
predict_step draws the samples of one chunk of indices (tcae-ldm sample, tcae_ldm.lit.sampling), and
from_official_dit() wraps a published facebookresearch/DiT checkpoint in this module, to sample it the same way.
"""
from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from tcae_ldm.data.transforms import to_uint8
from tcae_ldm.diffusion import DDPM, OBJECTIVES, create_objective
from tcae_ldm.diffusion.ddpm import DDPM_SAMPLERS
from tcae_ldm.diffusion.flow import FLOW_SAMPLERS
from tcae_ldm.latents.cache import LatentNormalizer, read_metadata
from tcae_ldm.latents.frozen import (
    AutoencoderSpec,
    FrozenAutoencoder,
    describe_identity,
    identity_mismatch,
    load_autoencoder,
)
from tcae_ldm.lit.compiling import CompileSpec, compile_in_place
from tcae_ldm.lit.compute import dit_step_gmacs, log_value
from tcae_ldm.lit.guards import WriteFailureNote, check_loss
from tcae_ldm.lit.outputs import grad_norm, save_grid
from tcae_ldm.lit.preemption import Preemption
from tcae_ldm.lit.preflight import preflight
from tcae_ldm.lit.resume import SafeResume
from tcae_ldm.lit.schedules import param_groups
from tcae_ldm.metrics.convergence import TRAIN_COMPUTE_COLUMN
from tcae_ldm.models.dit import DiT, create_dit, dit_from_official
from tcae_ldm.models.ema import EMA
from tcae_ldm.models.sdvae import SD_VAE_DEFAULT, SD_VAE_SCALE
from tcae_ldm.utils.kwargs import check_keywords, keyword_dict, parameter_types
from tcae_ldm.utils.seeding import default_seed, seed_of

LINKED = ("input_size", "in_channels", "num_classes")
DiTArgs = keyword_dict("DiTArgs", parameter_types(DiT))  # model.dit_args: DiT constructor arguments
# model.objective_args: the arguments of any objective (create_objective refuses those of another one)
ObjectiveArgs = keyword_dict("ObjectiveArgs", parameter_types(*OBJECTIVES.values()))
DEFAULT_SAMPLER = {"flow": "euler", "ddpm": "ddpm"}


class DiffusionModule(L.LightningModule):
    """Latent DiT training (flow or DDPM objective), EMA weights for sampling, CFG sampling and decoding.

    Args:
        dit: preset of tcae_ldm.models.dit ('DiT-XL/1': one token per position of an 8x8 latent).
        dit_args: overrides of the preset's DiT arguments (learn_sigma, class_dropout_prob, depth, ...); its input
            size, channels and classes come from the latent cache.
        objective: training objective and its sampler family: 'flow' (rectified flow) or 'ddpm' (DiT's).
        objective_args: arguments of the objective (flow: time_sampling; ddpm: its schedule).
        optimizer: optimizer of the DiT.
        warmup_steps: linear learning-rate warm-up (DiT: none).
        ema_decay: decay of the EMA weights that sample (DiT: 0.9999; null: no EMA).
        ema_warmup: decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a short run's EMA leaves the init.
        grad_clip: gradient-norm clipping (null: none; DiT trains without); the norm is logged either way.
        sample_steps: sampling steps of the grids and `tcae-ldm sample`.
        sampler: 'euler' / 'heun' (flow), 'ddpm' / 'ddim' (ddpm); default: the objective's own.
        cfg_scale: classifier-free guidance scale; 1 is none (the paper's gFID setting).
        cfg_interval: [t_lo, t_hi]: guidance only for model time t in it (null: everywhere).
        sample_every_n_steps: a grid of EMA samples every N steps in <log dir>/samples/ and the logger (0: off).
        sample_grid_size: samples in that grid (its classes cycle).
        autoencoder: decoder of samples {kind, path, dtype}; null: the one recorded in the cache's metadata.
        seed: seed of the training noise and the grids (default: the run's seed_everything).
        latent_shape: (c, h, w) of the cache's latents, linked from the datamodule by the CLI; checkpoints keep it.
        num_classes: classes of the cache's labels, linked like latent_shape.
        compile: torch.compile the trained DiT in place (true, or torch.compile kwargs); checkpoint keys do not
            change and the EMA copy, which samples, stays eager.
        max_loss: a loss above this stops the run like a NaN does (a divergence), before the update; null: only
            NaN / inf stop it.
        cfg_channels: guide only the first k latent channels (null: all; the published DiT sampler guides 3).
        compile_decoder: torch.compile the autoencoder that decodes samples (grids, the gFID callback, `sample`) for
            inference (true, or torch.compile kwargs); images agree with eager ones within float rounding.
    """

    def __init__(self, dit: str = "DiT-XL/1", dit_args: DiTArgs | None = None, objective: str = "flow",
                 objective_args: ObjectiveArgs | None = None, optimizer: OptimizerCallable = torch.optim.AdamW,
                 warmup_steps: int = 0, ema_decay: float | None = 0.9999, ema_warmup: bool = False,
                 grad_clip: float | None = None, sample_steps: int = 50, sampler: str | None = None,
                 cfg_scale: float = 1.0, cfg_interval: tuple[float, float] | None = None,
                 sample_every_n_steps: int = 0, sample_grid_size: int = 16,
                 autoencoder: AutoencoderSpec | None = None, seed: int | None = None,
                 latent_shape: tuple[int, int, int] | None = None, num_classes: int | None = None,
                 compile: CompileSpec = False, max_loss: float | None = 1e4, cfg_channels: int | None = None,
                 compile_decoder: CompileSpec = False):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        check_keywords(dit_args, DiTArgs, "model.dit_args")
        check_keywords(objective_args, ObjectiveArgs, "model.objective_args")
        linked = sorted(set(dit_args or {}) & set(LINKED))
        if linked:
            raise ValueError(f"dit_args {linked} come from the latent cache (latent shape, classes); remove them")
        self.objective = create_objective(objective, **(objective_args or {}))
        self.optimizer_fn = optimizer
        self.seed = default_seed(seed)
        self.sampler = sampler or DEFAULT_SAMPLER[objective]
        self.dit = self.ema = self.normalizer = None
        self.cache_info: dict = {}  # cache dir + metadata, saved in checkpoints
        self.images_seen, self._grid_step, self._micro_step, self._micro = 0, None, None, 0
        self.compute_gmacs, self._gmacs_per_latent = 0.0, None  # training GMACs so far, summed over ranks
        self.__dict__["_autoencoder"] = None  # plain attribute: not a submodule, so never in the state_dict
        if latent_shape is not None and num_classes is not None:
            self._build(tuple(latent_shape), int(num_classes))

    # ------------------------------------------------------------------ model
    def _build(self, latent_shape: tuple[int, int, int], num_classes: int) -> None:
        c, h, w = latent_shape
        if h != w:
            raise ValueError(f"the DiT takes square latents, the cache holds {c}x{h}x{w}")
        self.hparams.latent_shape, self.hparams.num_classes = [c, h, w], num_classes
        self.dit = create_dit(self.hparams.dit, **{**(self.hparams.dit_args or {}), "input_size": h,
                                                   "in_channels": c, "num_classes": num_classes})
        self.ema = EMA(self.dit, self.hparams.ema_decay, self.hparams.ema_warmup) if self.hparams.ema_decay else None
        compile_in_place([self.dit], self.hparams.get("compile", False))  # after the EMA's (eager) copy
        self.normalizer = LatentNormalizer(c)

    def configure_model(self) -> None:
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "latent_shape"):
            if self.dit is None:
                raise ValueError("DiffusionModule sizes its DiT from a LatentDataModule (latent shape, classes); "
                                 "train with one, or load a checkpoint")
            return
        shape, ncls = tuple(dm.latent_shape), int(dm.num_classes)
        if self.dit is None:
            self._build(shape, ncls)
        elif (list(shape), ncls) != (list(self.hparams.latent_shape), self.hparams.num_classes):
            raise ValueError(f"this DiT was built for {self.hparams.latent_shape} latents and "
                             f"{self.hparams.num_classes} classes, the cache {dm.cache_dir} has {list(shape)} "
                             f"and {ncls}")
        self.normalizer.load_state_dict(dm.normalizer.state_dict())
        self.cache_info = {"dir": os.path.abspath(dm.cache_dir), "metadata": dm.metadata}

    @property
    def num_classes(self) -> int:
        return int(self.hparams.num_classes)

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights used for sampling: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.dit

    # ------------------------------------------------------------------ training
    def configure_callbacks(self):
        # atomic checkpoints, metrics history and LR changes across resumes; a checkpoint and exit status on
        # SIGTERM; a failed write names what to resume from
        return [SafeResume(), Preemption(), WriteFailureNote()]

    def prepare_data(self) -> None:
        preflight(self.trainer)  # everything a long run needs, checked before its first step

    def configure_optimizers(self):
        opt = self.optimizer_fn(param_groups(self.dit))
        if not self.hparams.warmup_steps:
            return opt
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val or self.hparams.grad_clip
        if not clip:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # No loss scaling (fp32, bf16-mixed): the gradients are the true ones, so clip them as Lightning's norm
            # clipping does. Lightning's mixed-precision plugin refuses any fused optimizer, bf16 included.
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        x, y = batch["latent"], batch["label"]
        # Lightning's batch_idx restarts differently after a mid-epoch resume; count micro-batches per step.
        self._micro = self._micro + 1 if self._micro_step == self.global_step else 0
        self._micro_step = self.global_step
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed_of(self.seed, self.global_rank, self.global_step, self._micro))
            loss = self.objective.loss(self.dit, x, y)
        check_loss(loss.detach(), self.global_step, self.hparams.get("max_loss", 1e4), self.trainer)
        n = x.shape[0]
        self.images_seen += n * self.trainer.world_size
        if self._gmacs_per_latent is None:  # counted once, on the meta device (tcae_ldm.lit.compute)
            self._gmacs_per_latent = dit_step_gmacs(self)
        self.compute_gmacs += self._gmacs_per_latent * n * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        self.log("train/images_seen", float(self.images_seen), batch_size=n)
        self.log(TRAIN_COMPUTE_COLUMN, log_value(self.compute_gmacs), batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # before clipping; under DDP the gradients are already reduced, so every rank logs the same norm
        self.log("train/grad_norm", grad_norm(self.dit.parameters()), batch_size=1)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: ModelCheckpoint saves in its on_train_batch_end, which runs before
        # the module's, and the EMA in a checkpoint must include the step its weights include.
        if self.ema is not None:
            self.ema.update(self.dit, self.global_step + 1)  # global_step counts this step after the hook

    def on_train_batch_end(self, outputs, batch, batch_idx):
        every, step = self.hparams.sample_every_n_steps, self.global_step
        if every and step % every == 0 and step != self._grid_step and self.trainer.is_global_zero:
            self._grid_step = step  # once per step, also with gradient accumulation
            self.save_sample_grid()

    # ------------------------------------------------------------------ sampling
    def set_sampling(self, steps: int | None = None, sampler: str | None = None, cfg_scale: float | None = None,
                     cfg_interval: tuple[float, float] | None = None, cfg_channels: int | None = None) -> None:
        """Change the sampling settings that sample() defaults to (those given; checked first)."""
        new = {"sample_steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "cfg_interval": cfg_interval,
               "cfg_channels": cfg_channels}
        new = {k: v for k, v in new.items() if v is not None}
        settings = {"sample_steps": self.hparams.sample_steps, "sampler": self.sampler,
                    "cfg_scale": self.hparams.cfg_scale, **new}
        self.check_sampling(settings["sample_steps"], settings["sampler"], settings["cfg_scale"])
        self.hparams.update(new)
        self.sampler = settings["sampler"]

    def check_sampling(self, steps: int, sampler: str, cfg_scale: float) -> None:
        """A ValueError naming the setting that this module cannot sample with."""
        samplers = FLOW_SAMPLERS if self.hparams.objective == "flow" else DDPM_SAMPLERS
        if sampler not in samplers:
            raise ValueError(f"sampler {sampler!r} does not fit the {self.hparams.objective} objective: choose one "
                             f"of {list(samplers)}")
        if steps < 1 or (isinstance(self.objective, DDPM) and steps > self.objective.num_timesteps):
            limit = f"1 .. {self.objective.num_timesteps}" if isinstance(self.objective, DDPM) else "at least 1"
            raise ValueError(f"{steps} sampling steps: the {self.hparams.objective} objective takes {limit}")
        if cfg_scale != 1.0 and self.eval_net.y_embedder.embedding_table.num_embeddings == self.num_classes:
            raise ValueError(f"cfg_scale={cfg_scale} needs a null class, but this DiT was trained without label "
                             f"dropout (dit_args.class_dropout_prob = 0)")

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seed: int = 0, steps: int | None = None, sampler: str | None = None,
               cfg_scale: float | None = None, cfg_interval: tuple[float, float] | None = None,
               decode: bool = True) -> torch.Tensor:
        """Samples for labels (B,) with the EMA weights: images (B, 3, H, W) in [-1, 1], or normalised latents."""
        hp = self.hparams
        net = self.eval_net
        cfg_scale = hp.cfg_scale if cfg_scale is None else cfg_scale
        steps, sampler = steps or hp.sample_steps, sampler or self.sampler
        self.check_sampling(steps, sampler, cfg_scale)
        was_training = net.training
        net.eval()  # no label dropout while sampling
        g = torch.Generator().manual_seed(seed)  # CPU noise: the same samples on any device
        noise = torch.randn((labels.shape[0], *hp.latent_shape), generator=g).to(self.device)
        kwargs = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                      cfg_interval=cfg_interval if cfg_interval is not None else hp.cfg_interval,
                      null_label=self.num_classes, guide_channels=hp.get("cfg_channels"))
        if isinstance(self.objective, DDPM):
            kwargs["generator"] = g
        z = self.objective.sample(net, noise, labels.to(self.device), **kwargs)
        net.train(was_training)
        return self.decode(z) if decode else z

    def predict_step(self, batch, batch_idx):
        """One chunk of `tcae-ldm sample`: {"index", "label", "seed"} -> uint8 images (B, H, W, 3) with their indices.
        The DiT runs under the trainer's precision, the decoder in fp32."""
        z = self.sample(batch["label"], seed=int(batch["seed"]), decode=False)
        with torch.autocast(self.device.type, enabled=False):
            images = self.decode(z.float())
        return {"index": batch["index"].cpu(), "images": to_uint8(images).permute(0, 2, 3, 1).cpu()}

    @classmethod
    def from_official_dit(cls, checkpoint: dict, autoencoder: AutoencoderSpec | None = None) -> "DiffusionModule":
        """A published facebookresearch/DiT checkpoint (DiT-XL-2-256x256.pt) as a module that samples as DiT does:
        DDPM with the learned variance, 250 respaced steps, CFG 1.5 on 3 of the 4 channels, SD-VAE latents
        scaled by 0.18215 (decoded by sd-vae-ft-ema unless another autoencoder is given)."""
        name, kwargs, state = dit_from_official(checkpoint)
        size = kwargs.pop("input_size")
        shape = [kwargs.pop("in_channels"), size, size]
        module = cls(dit=name, dit_args=kwargs, objective="ddpm", ema_decay=None, sample_steps=250, sampler="ddpm",
                     cfg_scale=1.5, cfg_channels=3, num_classes=kwargs.pop("num_classes"), latent_shape=shape,
                     autoencoder=autoencoder or {"kind": "sdvae", "path": SD_VAE_DEFAULT})
        module.dit.load_state_dict(state)
        module.normalizer.std.fill_(1 / SD_VAE_SCALE)  # DiT's latents are the VAE's times 0.18215, not centred
        return module

    def set_decoder(self, autoencoder: FrozenAutoencoder | AutoencoderSpec | None = None,
                    cache_dir: str | None = None) -> None:
        """Decode with another autoencoder and/or with the statistics of another cache folder."""
        if cache_dir is not None:
            self.normalizer.load_state_dict(LatentNormalizer.from_cache(cache_dir).state_dict())
            self.cache_info = {"dir": os.path.abspath(cache_dir), "metadata": read_metadata(cache_dir)}
        if isinstance(autoencoder, dict):
            autoencoder = load_autoencoder(**autoencoder)
        if autoencoder is not None:
            self._check_decoder(autoencoder)
            autoencoder.compile_(self.hparams.get("compile_decoder", False))
        self.__dict__["_autoencoder"] = autoencoder

    def _check_decoder(self, ae: FrozenAutoencoder) -> None:
        made_by = self.cache_info.get("metadata", {}).get("autoencoder")
        if made_by:
            expected = {k: made_by.get(k) for k in ("kind", "encoder_hash")}  # the same latent space
            bad = identity_mismatch(expected, ae.identity())
            if bad:
                raise ValueError(f"the latents were made by {describe_identity(made_by)}; decoding them with "
                                 f"{describe_identity(ae.identity())} (differs in {bad}) would give wrong images")

    @property
    def autoencoder(self) -> FrozenAutoencoder:
        """The decoder of samples: loaded on first use from `autoencoder`, else from the cache's metadata."""
        if self.__dict__["_autoencoder"] is None:
            spec = self.hparams.autoencoder or self.cache_info.get("metadata", {}).get("autoencoder_spec")
            if not spec:
                raise ValueError("no autoencoder to decode samples: set model.autoencoder {kind, path}")
            try:
                self.set_decoder(dict(spec))
            except OSError as e:  # moved to another machine: the recorded decoder stayed behind
                reason = "no such file or folder" if spec["kind"] == "tcae" else str(e).strip()  # not "train one"
                raise FileNotFoundError(f"the decoder of these latents ({spec['kind']} {spec['path']}) is not here "
                                        f"({reason}); give it with --autoencoder-kind {spec['kind']} "
                                        f"--autoencoder-path PATH (`tcae-ldm sample`) or model.autoencoder "
                                        f"{{kind, path}}") from None
        return self.__dict__["_autoencoder"].to(self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.autoencoder.decode(self.normalizer.denormalize(z)).clamp(-1, 1)

    def save_sample_grid(self) -> str:
        n = self.hparams.sample_grid_size
        images = self.sample(torch.arange(n) % self.num_classes, seed=self.seed)
        return save_grid(self.trainer, images, "samples", self.global_step, "samples", nrow=int(n ** 0.5))

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint):
        checkpoint["images_seen"] = self.images_seen
        checkpoint["compute_gmacs"] = self.compute_gmacs
        checkpoint["latent_cache"] = self.cache_info

    def on_load_checkpoint(self, checkpoint):
        self.images_seen = checkpoint.get("images_seen", 0)
        self.compute_gmacs = checkpoint.get("compute_gmacs", 0.0)
        saved = checkpoint.get("latent_cache") or {}
        current = self.cache_info.get("metadata")
        if current and saved.get("metadata"):
            bad = identity_mismatch({k: saved["metadata"]["autoencoder"].get(k) for k in ("kind", "encoder_hash")},
                                    current["autoencoder"])
            if bad:
                raise ValueError(f"this checkpoint was trained on latents of "
                                 f"{describe_identity(saved['metadata']['autoencoder'])}, the cache "
                                 f"{self.cache_info['dir']} holds latents of "
                                 f"{describe_identity(current['autoencoder'])}")
        if not current:
            self.cache_info = saved
