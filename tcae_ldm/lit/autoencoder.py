"""AutoencoderModule: trains a TC-AE with alpha * L_rec + L_iBOT (L_rec = L1 + LPIPS + GAN) by manual optimisation.

The same module trains a DC-AE (diffusers AutoencoderDC) with the same reconstruction losses (`net: DC-AE-...`),
so the two tokenizers of a comparison differ only in their architecture, and evaluates either one
(`tcae-ldm validate` / `test`: PSNR, SSIM, LPIPS and rFID with a named feature network).

It orchestrates; the networks live in tcae_ldm.models and the losses in tcae_ldm.losses. One training
step = one forward of the autoencoder, one backward of (generator loss + critic loss), then a step of each
optimizer. The generator loss reads the critic's weights detached (see ReconstructionLoss.critic), so the
single backward gives each optimizer exactly its own gradients and DDP sees one backward per forward.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from tcae_ldm.latents.frozen import autoencoder_weights
from tcae_ldm.lit.compiling import CompileSpec, compile_in_place
from tcae_ldm.lit.compute import AutoencoderStepCost, log_value
from tcae_ldm.lit.finetune import carry_over_critic, load_moments
from tcae_ldm.lit.guards import WriteFailureNote, check_loss
from tcae_ldm.lit.outputs import grad_norm, save_grid
from tcae_ldm.lit.preemption import Preemption
from tcae_ldm.lit.preflight import preflight
from tcae_ldm.lit.resume import SafeResume
from tcae_ldm.lit.schedules import param_groups, set_lr, warmup_cosine
from tcae_ldm.losses.lpips import FrozenLPIPS, build_lpips
from tcae_ldm.losses.reconstruction import ReconstructionLoss, ReconstructionLossConfig
from tcae_ldm.losses.ssl import SSLConfig, iBOTObjective
from tcae_ldm.metrics.features import build_feature_extractor
from tcae_ldm.metrics.fid import ReconstructionFID
from tcae_ldm.metrics.reconstruction import ReconstructionMetrics
from tcae_ldm.models.dcae import load_pretrained_weights
from tcae_ldm.models.ema import EMA
from tcae_ldm.models.zoo import autoencoder_family, constructor_types, create_autoencoder
from tcae_ldm.utils.checkpoints import read_checkpoint
from tcae_ldm.utils.kwargs import check_keywords, keyword_dict, merged_types

log = logging.getLogger(__name__)

# model.net_args: TC-AE or AutoencoderDC constructor arguments, or `pretrained` (a DC-AE folder / Hub id).
NetArgs = keyword_dict("NetArgs", merged_types(constructor_types("tcae"), constructor_types("dcae")))


class AutoencoderModule(L.LightningModule):
    """Autoencoder training (TC-AE or DC-AE): L1 + LPIPS + GAN, with iBOT when `ssl` is set (TC-AE only).

    Phase 'joint' trains the whole autoencoder, 'decoder_finetune' freezes the encoder and so the latent space.

    Args:
        net: preset of tcae_ldm.models.zoo: 'TC-AE-B/p8-c128' (the paper's), 'DC-AE/f32c32' (its baseline), ...
        net_args: overrides of the preset's constructor arguments (AutoencoderTC's, or AutoencoderDC's plus `pretrained`:
            a diffusers folder or Hub id whose weights initialise a DC-AE when the run starts); a key that neither
            takes fails when the config is parsed.
        image_size: side of the training images, linked from data.image_size by the CLI; sets TC-AE's token grid
            (DC-AE takes any multiple of its downsampling factor).
        loss: L_rec = L1 + lambda_p * LPIPS + lambda_q * GAN; the loss owns the critic.
        ssl: the joint iBOT objective (L_iBOT = L_CLS + L_MIM); null trains reconstruction only.
        optimizer: optimizer of the autoencoder (and the iBOT heads).
        disc_optimizer: optimizer of the critic.
        max_steps: generator updates; the run stops after the last one.
        warmup_steps: linear learning-rate warm-up, then cosine decay to min_lr_ratio x the base rate.
        min_lr_ratio: final learning rate as a fraction of the base rate.
        grad_clip: gradient-norm clipping, group by group (encoder, decoder, iBOT heads, critic), so that no
            group's norm scales down another's update (null: none); the norms are logged either way.
        ema_decay: decay of the EMA weights used by validation, testing and export (null: no EMA).
        phase: 'joint' trains the whole autoencoder; 'decoder_finetune' freezes the encoder.
        init_from: checkpoint whose autoencoder weights (its EMA when it has one) initialise a new run.
        metrics_lpips: LPIPS metric's VGG16 trunk: 'pretrained' (torch hub cache), 'random', a file, or null.
        metrics_fid: feature network of the rFID logged by validation and testing (tcae_ldm.metrics.features):
            'inception' is the papers' rFID, 'demo-classifier' the offline demo's proxy, null turns it off.
        metrics_fid_weights: weight file of that network (default: its standard location).
        val_grid_images: validation images shown in reconstructions/step*.png, originals over reconstructions.
        compile: torch.compile the encoder and decoder in place (true, or torch.compile kwargs); checkpoints keep
            their keys, the EMA copy stays eager.
        channels_last: convolution weights and images in channels-last memory format (faster convolutions on
            most GPUs and oneDNN CPUs; DC-AE and the critic are convolutional); values and checkpoints unchanged.
        max_loss: a total loss above this stops the run like a NaN does (a divergence), before the update; null:
            only NaN / inf stop it.

    Files that the weights do not hold (LPIPS' VGG16, the rFID network, a pretrained DC-AE) are read in
    configure_model / setup, when a run starts: a checkpoint loads without them, and a missing one is one error.
    """

    def __init__(self, net: str = "TC-AE-B/p8-c128", net_args: NetArgs | None = None, image_size: int | None = None,
                 loss: ReconstructionLossConfig | None = None, ssl: SSLConfig | None = None,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 disc_optimizer: OptimizerCallable = torch.optim.AdamW,
                 max_steps: int = 100_000, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 grad_clip: float | None = 1.0, ema_decay: float | None = None,
                 phase: Literal["joint", "decoder_finetune"] = "joint", init_from: str | None = None,
                 metrics_lpips: str | None = "pretrained", metrics_fid: str | None = None,
                 metrics_fid_weights: str | None = None, val_grid_images: int = 8, compile: CompileSpec = False,
                 channels_last: bool = False, max_loss: float | None = 1e4):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "disc_optimizer"])
        self.automatic_optimization = False
        check_keywords(net_args, NetArgs, "model.net_args")
        if ssl is not None and phase == "decoder_finetune":
            raise ValueError("decoder_finetune trains the decoder only: set model.ssl to null")
        family = autoencoder_family(net)
        if ssl is not None and family != "tcae":
            raise ValueError(f"iBOT reads the tokens of a ViT encoder; {net} is a convolutional DC-AE: set model.ssl "
                             f"to null")
        # iBOT needs a [CLS] token in the encoder; it is recorded in net_args because it takes part in the
        # encoder's attention, so every later rebuild of this network (finetune, cache, export) needs it too.
        net_args = {**(net_args or {}), **({"cls_token": True} if ssl else {})}
        if image_size is not None and family == "tcae":
            if net_args.setdefault("image_size", image_size) != image_size:
                raise ValueError(f"model.net_args.image_size={net_args['image_size']} but the images are "
                                 f"{image_size}x{image_size} (data.image_size): remove net_args.image_size")
        self.hparams["net_args"] = net_args
        self.pretrained = net_args.get("pretrained")  # a DC-AE's weights, loaded in setup()
        self.net = create_autoencoder(net, **{k: v for k, v in net_args.items() if k != "pretrained"})
        if image_size is not None:
            self.net.latent_shape(image_size)  # a size the network cannot compress fails here, naming the factor
        self.loss = ReconstructionLoss(loss)
        self.ssl = iBOTObjective(self.net.encoder, self.net.width, ssl) if ssl is not None else None
        self.optimizer_fn, self.disc_optimizer_fn, self.init_from = optimizer, disc_optimizer, init_from
        self.max_steps, self.warmup_steps, self.min_lr_ratio = max_steps, warmup_steps, min_lr_ratio
        self.grad_clip, self.phase, self.val_grid_images = grad_clip, phase, val_grid_images
        self.max_loss = max_loss
        if phase == "decoder_finetune":
            self.net.encoder.requires_grad_(False)  # the latent space is fixed from here on
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=self.memory_format)
            if self.loss.discriminator is not None:
                self.loss.discriminator.to(memory_format=self.memory_format)
        self.ema = EMA(self.net, ema_decay) if ema_decay else None
        compile_in_place([self.net.encoder, self.net.decoder], compile)  # after the EMA's (eager) copy
        self.val_metrics: ReconstructionMetrics | None = None  # built by configure_model
        self.step_count = 0  # generator updates; trainer.global_step counts both optimizers' steps
        self.from_checkpoint = False  # weights restored from a checkpoint: init_from / pretrained must not replace them
        # training GMACs and seconds so far, summed over ranks (tcae_ldm.lit.compute); checkpoints keep them
        self.compute_gmacs, self.train_seconds, self.step_cost = 0.0, 0.0, AutoencoderStepCost(self)
        self.critic_moments: dict | None = None  # the joint phase's critic optimizer state, for decoder finetuning

    # ------------------------------------------------------------------ setup
    def load_weights(self, path: str) -> dict:
        """Initialise the autoencoder from another run's checkpoint (EMA weights when it has them); returns it."""
        ckpt = read_checkpoint(path, what="init_from checkpoint")
        source, weights = autoencoder_weights(ckpt["state_dict"])
        missing, unexpected = self.net.load_state_dict(weights, strict=False)
        if missing or unexpected:
            hint = (" (the encoder was trained with iBOT's [CLS] token: set model.net_args.cls_token: true)"
                    if "encoder.cls_token" in unexpected else "")
            raise ValueError(f"checkpoint {path} does not fit net={self.hparams.net}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}{hint}")
        log.info("initialised the autoencoder from %s (%s weights)", path, source)
        return ckpt

    def configure_callbacks(self):
        # atomic checkpoints, metrics history and LR changes across resumes; a checkpoint and exit status on
        # SIGTERM; a failed write names what to resume from
        return [SafeResume(), Preemption(), WriteFailureNote()]

    def prepare_data(self) -> None:
        preflight(self.trainer)  # everything a long run needs, checked before its first step

    def setup(self, stage: str) -> None:
        # Initialise from a pretrained DC-AE (any stage: `validate` scores the published weights) or from another
        # run (when training starts), not when this module was rebuilt from its own checkpoint; a resumed run then
        # overwrites these weights with its checkpoint's.
        if self.from_checkpoint or self.step_count:
            return
        initialised = False
        if self.pretrained:
            load_pretrained_weights(self.net, self.pretrained, self.hparams.net)
            initialised = True
        if stage == "fit" and self.init_from:
            ckpt = self.load_weights(self.init_from)
            if self.phase == "decoder_finetune":  # the joint phase's critic too (tcae_ldm.lit.finetune)
                self.critic_moments = carry_over_critic(self.loss.discriminator, ckpt, self.init_from)
            initialised = True
        if initialised and self.ema is not None:
            self.ema.module.load_state_dict(self.net.state_dict())
        if initialised and self.ssl is not None:  # the teacher starts as the student, as at construction
            self.ssl.init_teacher(self.net.encoder)

    def configure_model(self) -> None:
        """The measuring networks, built when a run starts: LPIPS (loss and metric) and the rFID network."""
        if self.val_metrics is not None:
            return
        lpips = self.loss.load_lpips()
        if lpips is None and self.hparams.metrics_lpips:
            lpips = FrozenLPIPS(build_lpips(self.hparams.metrics_lpips))
        fid = self.hparams.metrics_fid
        fid = ReconstructionFID(build_feature_extractor(fid, self.hparams.metrics_fid_weights)) if fid else None
        self.val_metrics = ReconstructionMetrics(lpips, fid)

    def configure_optimizers(self):
        trainable = torch.nn.ModuleList([self.net] + ([self.ssl.heads] if self.ssl is not None else []))
        opt_g = self.optimizer_fn(param_groups(trainable))
        opts = [opt_g]
        if self.loss.discriminator is not None:
            opts.append(self.disc_optimizer_fn(param_groups(self.loss.discriminator)))
        return opts

    def on_train_start(self):
        if self.phase == "decoder_finetune":
            self.net.encoder.eval()
            if self.critic_moments is not None and self.trainer.ckpt_path is None:  # a resume has its own
                load_moments(self.trainer.optimizers[1], self.critic_moments)
            self.critic_moments = None
        if self.step_count >= self.max_steps:  # a finished run resumed: nothing left to do, nothing changes
            self.trainer.should_stop = True

    def on_train_epoch_start(self):
        if self.phase == "decoder_finetune":
            self.net.encoder.eval()  # Lightning sets train() on the whole module every epoch

    # ------------------------------------------------------------------ training
    def reconstruct(self, x):
        """(x_rec, z) through the network's tensor modules (compiled in place when `compile` is on)."""
        with torch.no_grad() if self.phase == "decoder_finetune" else contextlib.nullcontext():
            z = self.net.encoder(x)
        return self.net.decoder(z), z

    def training_losses(self, batch, step: int):
        """The forward half of a training step: (total loss for the one backward pass, logs, GAN active)."""
        x = batch["image"].contiguous(memory_format=self.memory_format)
        x_rec, z = self.reconstruct(x)
        loss, logs = self.loss.generator_loss(x, x_rec, step, last_layer=self.net.last_layer)
        logs["loss_g"] = loss.detach()
        total = loss
        if self.ssl is not None:
            if "global" not in batch:
                raise KeyError("model.ssl is set but the batches carry no iBOT views: set data.init_args.views")
            ssl_loss, ssl_logs = self.ssl(self.net.encoder, batch["global"], batch["local"], step)
            total, logs = self.ssl.cfg.alpha * loss + ssl_loss, {**logs, **ssl_logs}
        gan = self.loss.gan_active(step)
        if gan:
            loss_d, d_logs = self.loss.discriminator_loss(x, x_rec, step)
            total, logs = total + loss_d, {**logs, **d_logs}
        return total, logs, gan

    def apply_update(self, opts, step: int, gan: bool) -> dict:
        """The half after the backward pass: clip and step each optimizer, then move the teacher and the EMA."""
        logs = {}
        if self.ssl is not None:
            self.ssl.cancel_last_layer_grads(step)
        logs.update(self._clip_and_step(opts[0], self._generator_clip_groups()))
        if gan:
            logs.update(self._clip_and_step(opts[1], {"critic": self.loss.discriminator}))
        self.step_count += 1
        if self.ssl is not None:
            logs["teacher_momentum"] = self.ssl.update_teacher(self.net.encoder, step, self.max_steps)
        if self.ema is not None:
            self.ema.update(self.net, self.step_count)
        return logs

    def training_step(self, batch, batch_idx):
        if self.step_count >= self.max_steps:  # checked before any update: the run is complete
            self.trainer.should_stop = True
            return None
        step, started = self.step_count, time.perf_counter()
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        total, logs, gan = self.training_losses(batch, step)
        check_loss(total.detach(), step, self.max_loss, self.trainer, terms=logs)
        lr_factor = warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        for o in opts:
            set_lr(o, lr_factor)
            o.zero_grad(set_to_none=True)
        self.manual_backward(total)
        logs.update(self.apply_update(opts, step, gan))
        self.train_seconds += time.perf_counter() - started  # before the first count of a phase, which takes seconds
        self.compute_gmacs += self.step_cost(batch, step) * batch["image"].shape[0] * self.trainer.world_size
        logs.update(compute_gmacs=log_value(self.compute_gmacs), wall_time_s=self.train_seconds)
        self._log_train(logs, opts[0], batch)
        if self.step_count >= self.max_steps:
            self.trainer.should_stop = True

    def _generator_clip_groups(self) -> dict:
        # Each group is clipped by its own gradient norm. One norm over everything would let the iBOT heads
        # (whose gradient norm is several times the autoencoder's early on) and the encoder's SSL gradient scale
        # down the decoder's reconstruction update; per group, the decoder's clipping answers to L_rec alone.
        groups = {"encoder": self.net.encoder, "decoder": self.net.decoder}
        if self.ssl is not None:
            groups["ssl_heads"] = self.ssl.heads
        return groups

    def _clip_and_step(self, opt, groups: dict) -> dict:
        """Clip each group's gradient to norm grad_clip, step; returns the norms before clipping."""
        norms = {}
        for name, module in groups.items():
            grads = [p for p in module.parameters() if p.grad is not None]
            if not grads:
                continue
            norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip) if self.grad_clip else grad_norm(grads)
            norms[f"grad_norm/{name}"] = norm.detach()
        opt.step()
        return norms

    def _log_train(self, logs, opt, batch):
        logs = {f"train/{k}": v for k, v in logs.items()}
        logs["train/lr"] = opt.param_groups[0]["lr"]
        logs["train/step"] = float(self.step_count)
        if batch.get("skipped"):
            logs["data/skipped"] = float(batch["skipped"])
        n = batch["image"].shape[0]
        self.log_dict(logs, batch_size=n)
        self.log("loss", logs["train/loss_g"], prog_bar=True, logger=False, batch_size=n)

    # ------------------------------------------------------------------ evaluation
    @property
    def eval_net(self):
        """Weights used for validation, testing and export: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return  # every file of this batch was unusable (data.skip_corrupt): the datamodule skipped it
        x = batch["image"].contiguous(memory_format=self.memory_format)
        x_rec = self.eval_net(x).sample
        self.val_metrics.update(x, x_rec)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.fast_dev_run:
            self._save_grid(x[: self.val_grid_images], x_rec[: self.val_grid_images])

    def on_validation_epoch_end(self):
        prefix = "test" if self.trainer.testing else "val"
        self.log_dict({f"{prefix}/{k}": v for k, v in self.val_metrics.compute().items()}, sync_dist=True)
        self.val_metrics.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def _save_grid(self, x, x_rec):
        """Originals (top row) over reconstructions: reconstructions/step*.png and the logger."""
        save_grid(self.trainer, torch.cat([x, x_rec]), "reconstructions", self.step_count, "val/reconstructions",
                  nrow=x.shape[0])

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint):
        checkpoint["step_count"] = self.step_count
        checkpoint["compute"] = {"gmacs": self.compute_gmacs, "seconds": self.train_seconds}

    def on_load_checkpoint(self, checkpoint):
        self.step_count = checkpoint.get("step_count", 0)
        compute = checkpoint.get("compute", {})
        self.compute_gmacs, self.train_seconds = compute.get("gmacs", 0.0), compute.get("seconds", 0.0)
        self.from_checkpoint = True
