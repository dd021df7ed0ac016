"""AutoencoderModule: which parameters a step changes, exact resume, NaN guard, decoder finetuning, DDP,
joint iBOT training, and DC-AE trained and evaluated by the same module."""
import copy
import csv
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from diffusers import AutoencoderDC

from tcae_ldm.cli import lightning_main
from tcae_ldm.cli import main as cli_main
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.latents.frozen import DCAEAutoencoder, load_autoencoder
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.guards import NonFiniteLossError
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.models.dcae import DCAE_PRESETS
from tcae_ldm.utils.checkpoints import read_checkpoint
from tests.tiny import (
    REPO,
    TINY,
    TINY_DCAE,
    isolated_env,
    tiny_data,
    tiny_module,
    tiny_trainer,
)


def _ssl_module(ssl_args=None, **kw):
    from tcae_ldm.losses.ssl import SSLConfig

    ssl = SSLConfig(out_dim=64, patch_out_dim=64, hidden_dim=32, bottleneck_dim=16, teacher_temp_warmup_steps=2,
                    **(ssl_args or {}))
    return tiny_module(ssl=ssl, **kw)


def _ssl_data():
    from tcae_ldm.data.views import MultiCropConfig

    views = MultiCropConfig(global_size=32, local_size=16, num_local=2)
    return DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1, global_batch_size=16, hflip=False,
                                views=views)


def test_one_step_updates_generator_critic_and_ema(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(max_steps=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert module.step_count == 1
    assert any(k.startswith("net.decoder.") for k in changed)
    assert any(k.startswith("loss.discriminator.") for k in changed)
    assert any(k.startswith("ema.module.") for k in changed)


def test_resume_from_last_continues_identically(tmp_path):
    L.seed_everything(0)
    straight = tiny_module()
    tiny_trainer(str(tmp_path / "a")).fit(straight, tiny_data())

    L.seed_everything(0)
    first = tiny_module()
    tiny_trainer(str(tmp_path / "b"), max_epochs=2).fit(first, tiny_data())  # interrupted after 2 of 4 steps
    assert first.step_count == 2
    resumed = tiny_module()
    trainer = tiny_trainer(str(tmp_path / "b"))
    trainer.fit(resumed, tiny_data(), ckpt_path="last")
    assert resumed.step_count == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    sa, sb = straight.optimizers()[0].optimizer.state_dict(), trainer.optimizers[0].state_dict()
    for k in sa["state"]:
        assert torch.allclose(sa["state"][k]["exp_avg_sq"], sb["state"][k]["exp_avg_sq"], atol=1e-9)


def _fit_demo(out, *extra):
    """configs/demo/tcae.yaml as shipped (flips, iBOT views with their augmentations, the critic from step 2),
    shrunk: 24 crops / 8 = 3 batches per epoch, 7 steps, last.ckpt after every batch, validation every 2 epochs."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": f"{out}/ckpt", "every_n_train_steps": 1, "save_top_k": 0, "save_last": True,
                                "monitor": None}}]  # the list item is merged into the config's, which monitors
    cli_main(["fit", "--config", os.path.join(REPO, "configs/demo/tcae.yaml"), *TINY,
              "--data.init_args.train_per_class=3", "--model.init_args.max_steps=7",
              "--model.init_args.loss.disc_start=2", "--model.init_args.ssl.teacher_temp_warmup_steps=4",
              f"--trainer.logger.init_args.save_dir={out}", f"--trainer.callbacks={json.dumps(callbacks)}", *extra])
    return torch.load(f"{out}/ckpt/last.ckpt", map_location="cpu", weights_only=False)


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_demo_config_resumes_mid_epoch_bit_for_bit(tmp_path, monkeypatch):
    straight = _fit_demo(tmp_path / "a")
    assert straight["step_count"] == 7

    def crash_at_step_4(self, batch, batch_idx):  # a run killed during batch 1 of the 3 of epoch 1
        if self.step_count == 4:
            raise SystemExit("killed")
        return train(self, batch, batch_idx)

    train = AutoencoderModule.training_step
    monkeypatch.setattr(AutoencoderModule, "training_step", crash_at_step_4)
    with pytest.raises(SystemExit, match="killed"):
        _fit_demo(tmp_path / "b")
    monkeypatch.undo()
    last = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["step_count"] == 4  # the loader's position in the epoch is in the checkpoint
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    resumed = _fit_demo(tmp_path / "b", "--ckpt_path=last")  # then validates after epoch 1, as the straight run
    assert resumed["step_count"] == 7
    _assert_bitwise_equal(straight["state_dict"], resumed["state_dict"], "state_dict")
    _assert_bitwise_equal(straight["optimizer_states"], resumed["optimizer_states"], "optimizer_states")
    # training compute (GAN from step 2, iBOT views) continues from the checkpoint to the straight run's total
    assert resumed["compute"]["gmacs"] == pytest.approx(straight["compute"]["gmacs"], rel=1e-12)
    assert straight["compute"]["gmacs"] > 0


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    module = tiny_module(max_steps=10)
    real = module.loss.generator_loss

    def poisoned(x, x_rec, step, last_layer=None):
        loss, logs = real(x, x_rec, step, last_layer)
        return (loss * float("nan") if step >= 3 else loss), logs

    monkeypatch.setattr(module.loss, "generator_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        tiny_trainer(str(tmp_path)).fit(module, tiny_data())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["step_count"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_decoder_finetune_freezes_the_encoder_and_its_latents(tmp_path):
    L.seed_everything(0)
    joint = tiny_module(max_steps=2)
    tiny_trainer(str(tmp_path / "joint")).fit(joint, tiny_data())
    ft = tiny_module(phase="decoder_finetune", init_from=str(tmp_path / "joint" / "ckpt" / "last.ckpt"), max_steps=2,
                 ema_decay=None)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    start = joint.ema.module  # the joint run's EMA weights are what the finetune starts from
    enc = {k: v.clone() for k, v in start.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in start.decoder.state_dict().items()}
    with torch.no_grad():
        z0 = start.encode(x).latent
    tiny_trainer(str(tmp_path / "ft")).fit(ft, tiny_data())
    assert all(torch.equal(v, ft.net.encoder.state_dict()[k]) for k, v in enc.items())
    with torch.no_grad():
        assert torch.equal(z0, ft.net.encode(x).latent)
    assert any(not torch.equal(v, ft.net.decoder.state_dict()[k]) for k, v in dec.items())


def test_decoder_finetune_starts_from_the_joint_phases_critic_and_its_moments(tmp_path):
    L.seed_everything(0)
    tiny_trainer(str(tmp_path / "joint")).fit(tiny_module(max_steps=2), tiny_data())
    joint = read_checkpoint(str(tmp_path / "joint" / "ckpt" / "last.ckpt"))
    ft = tiny_module(phase="decoder_finetune", init_from=str(tmp_path / "joint" / "ckpt" / "last.ckpt"), max_steps=1,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                     disc_optimizer=lambda p: torch.optim.AdamW(p, lr=5e-5))
    seen = {}

    class AtStepZero(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["critic"] = {k: v.clone() for k, v in module.loss.discriminator.state_dict().items()}
            seen["moments"] = copy.deepcopy(trainer.optimizers[1].state_dict())  # the step updates it in place

    tiny_trainer(str(tmp_path / "ft"), callbacks=[AtStepZero()]).fit(ft, tiny_data())
    critic = {k[len("loss.discriminator."):]: v for k, v in joint["state_dict"].items()
              if k.startswith("loss.discriminator.")}
    assert critic and seen["critic"].keys() == critic.keys()
    assert all(torch.equal(seen["critic"][k], v) for k, v in critic.items())
    mine, theirs = seen["moments"], joint["optimizer_states"][1]
    assert mine["state"].keys() == theirs["state"].keys() and len(mine["state"]) == len(critic)
    for i, st in theirs["state"].items():
        assert torch.equal(mine["state"][i]["exp_avg"], st["exp_avg"]) and mine["state"][i]["step"] == st["step"]
    assert mine["param_groups"][0]["lr"] != theirs["param_groups"][0]["lr"]  # the phase keeps its own schedule


def test_fit_and_validate_through_the_cli(tmp_path):
    out = str(tmp_path)
    common = ["--config", os.path.join(REPO, "configs/demo/tcae.yaml"), *TINY,
              f"--trainer.logger.init_args.save_dir={out}", f"--trainer.callbacks.init_args.dirpath={out}/ckpt"]
    cli_main(["fit", *common, "--model.init_args.max_steps=2", "--trainer.check_val_every_n_epoch=1"])
    assert sorted(os.listdir(os.path.join(out, "tcae", "reconstructions"))) == ["step0000000.png", "step0000002.png"]
    assert os.path.exists(os.path.join(out, "ckpt", "best.ckpt"))
    with open(os.path.join(out, "tcae", "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"val/psnr", "val/ssim", "train/l1", "train/lr"} <= set(header)
    cli_main(["validate", *common, f"--ckpt_path={out}/ckpt/last.ckpt"])


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    """Two gloo processes train a few steps; rank 0 writes a checkpoint at the right step."""
    out = str(tmp_path)
    cmd = [sys.executable, "-m", "tcae_ldm.cli", "fit", "--config", "configs/demo/tcae.yaml", *TINY,
           "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
           "--trainer.check_val_every_n_epoch=1", "--model.init_args.max_steps=2",
           "--model.init_args.loss.disc_start=0",
           f"--trainer.logger.init_args.save_dir={out}", f"--trainer.callbacks.init_args.dirpath={out}/ckpt"]
    res = subprocess.run(cmd, cwd=REPO, env=isolated_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(os.path.join(out, "ckpt", "last.ckpt"), weights_only=False)
    assert ckpt["step_count"] == 2
    assert "val/psnr" in open(os.path.join(out, "tcae", "metrics.csv")).readline()


def test_joint_ibot_step_trains_student_and_moves_teacher_by_ema(tmp_path):
    torch.manual_seed(0)
    module = _ssl_module(max_steps=1)
    assert module.net.encoder.cls_token is not None
    teacher0 = {k: v.clone() for k, v in module.ssl.teacher.state_dict().items()}
    enc0 = {k: v.clone() for k, v in module.net.encoder.state_dict().items()}
    heads0 = {k: v.clone() for k, v in module.ssl.heads.state_dict().items()}
    tiny_trainer(str(tmp_path)).fit(module, _ssl_data())
    assert not any(p.requires_grad for p in module.ssl.teacher.parameters())
    assert all(p.grad is None for p in module.ssl.teacher.parameters())
    assert any(not torch.equal(v, module.ssl.heads.state_dict()[k]) for k, v in heads0.items())
    # teacher = m * teacher + (1 - m) * student, with m = 0.996 at step 0
    enc1, t1 = module.net.encoder.state_dict(), module.ssl.teacher.state_dict()
    k = "fine.blocks.0.attn.qkv.weight"
    expected = 0.996 * teacher0[f"encoder.{k}"] + 0.004 * enc1[k]
    assert torch.allclose(t1[f"encoder.{k}"], expected, atol=1e-7)
    assert not torch.equal(enc0[k], enc1[k])


def test_module_with_ibot_heads_pickles():
    """ddp_spawn pickles the module to start its processes (a 2-process spawn run takes half a minute, so the
    test stops at the pickling, which is what failed with torch's weight-norm parametrization)."""
    import functools
    import pickle

    module = _ssl_module(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                         disc_optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    copy = pickle.loads(pickle.dumps(module))
    cls, tokens = torch.randn(2, 32), torch.randn(2, 3, 32)
    for a, b in zip(module.ssl.heads(cls, tokens), copy.ssl.heads(cls, tokens)):
        assert torch.equal(a, b)


def test_freeze_last_layer_keeps_the_prototypes_for_its_steps(tmp_path):
    torch.manual_seed(0)
    module = _ssl_module(max_steps=1, ssl_args={"freeze_last_layer_steps": 1})
    heads0 = {k: v.clone() for k, v in module.ssl.heads.state_dict().items()}
    tiny_trainer(str(tmp_path)).fit(module, _ssl_data())
    changed = {k for k, v in module.ssl.heads.state_dict().items() if not torch.equal(v, heads0[k])}
    assert changed and not any("last_layer" in k for k in changed)  # the MLP learned, the prototypes did not


def test_each_group_is_clipped_by_its_own_gradient_norm():
    """A large SSL-head gradient does not scale down the decoder's (reconstruction) update."""
    module = _ssl_module()
    groups = module._generator_clip_groups()
    assert list(groups) == ["encoder", "decoder", "ssl_heads"]
    norms_in = {"encoder": 3.0, "decoder": 0.5, "ssl_heads": 100.0}
    for name, m in groups.items():
        params = list(m.parameters())
        for p in params:
            p.grad = torch.full_like(p, norms_in[name] / sum(q.numel() for q in params) ** 0.5)
    decoder_grads = [p.grad.clone() for p in module.net.decoder.parameters()]

    class _Stepless:
        def step(self):
            pass

    norms = module._clip_and_step(_Stepless(), groups)
    assert {k: round(float(v), 4) for k, v in norms.items()} == {f"grad_norm/{k}": v for k, v in norms_in.items()}
    assert all(torch.equal(a, p.grad) for a, p in zip(decoder_grads, module.net.decoder.parameters()))
    for name in ("encoder", "ssl_heads"):
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in groups[name].parameters()]))
        assert total == pytest.approx(1.0, rel=1e-5)


def test_init_from_initialises_the_teacher(tmp_path):
    torch.manual_seed(0)
    joint = _ssl_module(max_steps=1)
    tiny_trainer(str(tmp_path / "joint")).fit(joint, _ssl_data())
    ckpt = str(tmp_path / "joint" / "ckpt" / "last.ckpt")
    torch.manual_seed(1)
    fresh = _ssl_module(init_from=ckpt)
    fresh.setup("fit")
    student, teacher = fresh.net.encoder.state_dict(), fresh.ssl.teacher["encoder"].state_dict()
    assert all(torch.equal(v, student[k]) for k, v in teacher.items())
    assert all(torch.equal(v, joint.eval_net.encoder.state_dict()[k]) for k, v in teacher.items())  # EMA weights


def test_ssl_without_views_and_ssl_in_decoder_finetune_are_refused(tmp_path):
    with pytest.raises(ValueError, match="set model.ssl to null"):
        _ssl_module(phase="decoder_finetune")
    with pytest.raises(KeyError, match="data.init_args.views"):
        tiny_trainer(str(tmp_path)).fit(_ssl_module(max_steps=1), tiny_data())


def test_joint_checkpoint_rebuilds_its_encoder_with_the_cls_token(tmp_path):
    """The [CLS] token takes part in the encoder's attention: caches and finetunes must keep it."""
    from tcae_ldm.latents.frozen import TCAEAutoencoder

    torch.manual_seed(0)
    joint = _ssl_module(max_steps=1)
    tiny_trainer(str(tmp_path / "joint")).fit(joint, _ssl_data())
    ckpt = str(tmp_path / "joint" / "ckpt" / "last.ckpt")
    frozen = TCAEAutoencoder.from_checkpoint(ckpt)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(frozen.encode(x), joint.eval_net.encode(x).latent)
    with pytest.raises(ValueError, match="cls_token: true"):
        tiny_module(phase="decoder_finetune", init_from=ckpt, ema_decay=None).setup("fit")
    ft = tiny_module(phase="decoder_finetune", init_from=ckpt, ema_decay=None,
                 net_args={"image_size": 32, "latent_size": 2, "cls_token": True})
    ft.setup("fit")
    with torch.no_grad():
        assert torch.equal(ft.net.encode(x).latent, joint.eval_net.encode(x).latent)


def _read_metrics(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def test_module_trains_a_dcae_whose_checkpoint_loads_frozen(tmp_path):
    L.seed_everything(0)
    module = AutoencoderModule(
        net=TINY_DCAE, loss=ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.1, disc_start=0, disc_channels=8,
                                                disc_layers=2),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), disc_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        max_steps=2, ema_decay=0.9, metrics_lpips=None, metrics_fid="random")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=100, default_root_dir=str(tmp_path))
    trainer.fit(module, DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1, global_batch_size=16))
    changed = {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
    for part in ("net.encoder.", "net.decoder.", "loss.discriminator.", "ema.module."):
        assert any(k.startswith(part) for k in changed), part     # the same losses train every part
    ckpt = str(tmp_path / "dcae.ckpt")
    trainer.save_checkpoint(ckpt)

    frozen = load_autoencoder("dcae", ckpt)
    assert isinstance(frozen, DCAEAutoencoder) and frozen.name == TINY_DCAE
    assert frozen.latent_shape(32) == (16, 2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(frozen.encode(x), module.eval_net.eval().encode(x).latent)  # the EMA weights, as validation
    assert frozen.gmacs(32) > 0
    with pytest.raises(ValueError, match="holds a DC-AE-T/f16c16 autoencoder, not a tcae one: load it with kind 'dcae'"):
        load_autoencoder("tcae", ckpt)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_cli_evaluates_a_pretrained_dcae_with_rfid(subcommand, tmp_path):
    """`tcae-ldm validate|test` on a DC-AE config: rFID (named by its network), PSNR and SSIM, no training."""
    torch.manual_seed(0)
    AutoencoderDC(**DCAE_PRESETS[TINY_DCAE]).save_pretrained(tmp_path / "dcae")
    lightning_main([subcommand, "--config", os.path.join(REPO, "configs/demo/dcae.yaml"),
                    f"--model.init_args.net={TINY_DCAE}", f"--model.init_args.net_args={{pretrained: {tmp_path / 'dcae'}}}",
                    "--model.init_args.metrics_fid=random", "--model.init_args.ema_decay=null",
                    "--model.init_args.loss.disc_channels=8", "--data.init_args.image_size=32",
                    "--data.init_args.train_per_class=1", "--data.init_args.val_per_class=2",
                    f"--trainer.logger.init_args.save_dir={tmp_path}"])
    metrics = _read_metrics(tmp_path / "dcae" / "metrics.csv")
    prefix = "val" if subcommand == "validate" else "test"
    assert {f"{prefix}/rfid_random", f"{prefix}/psnr", f"{prefix}/ssim"} <= set(metrics)
    assert metrics[f"{prefix}/rfid_random"] > 0 and 0 < metrics[f"{prefix}/psnr"] < 60

