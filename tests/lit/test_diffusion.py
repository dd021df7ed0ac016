"""DiffusionModule through the CLI: linked latent shape, checkpoint contents, exact resume, EMA sampling, `sample`."""
import csv
import logging
import os
import shutil

import pytest
import torch

from tcae_ldm.cli import main, run
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.caching import cache_latents
from tcae_ldm.diffusion.flow import RectifiedFlow
from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.lit.guards import NonFiniteLossError
from tests.tiny import REPO, callbacks_arg, tiny_tcae_checkpoint

DEMO = os.path.join(REPO, "configs", "demo", "dit_on_tcae.yaml")


def _fit_argv(cache, ckpt, steps):
    return ["fit", "--config", DEMO, f"--data.cache_dir={cache}", "--data.expect_image_size=32",
            "--data.expect_autoencoder.name=TC-AE-T/p4-c16", f"--data.expect_autoencoder.path={ckpt}",
            "--data.global_batch_size=8",
            "--model.dit=DiT-T/1", "--model.dit_args={class_dropout_prob: 0.1}", "--model.sample_steps=2",
            "--model.sample_every_n_steps=2", "--model.sample_grid_size=4", "--model.warmup_steps=3",
            callbacks_arg(), "--trainer.log_every_n_steps=1", f"--trainer.max_steps={steps}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 16-image cache of 16x4x4 latents, then DiT-T/1 runs from the demo config: 5 steps straight, and
    3 steps + resume from `last` to 5 (batch 8: the resume falls in the middle of a pass over the cache)."""
    root = tmp_path_factory.mktemp("dit")
    ckpt = tiny_tcae_checkpoint(root / "ae.ckpt", seed=0)
    images = DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1)
    cache = cache_latents({"kind": "tcae", "path": ckpt}, images, str(root / "latents"), accelerator="cpu")
    old = os.getcwd()
    out = {"root": root, "ae": ckpt, "cache": cache}
    try:
        for name, phases in (("straight", [5]), ("resumed", [3, 5])):
            os.makedirs(root / name)
            os.chdir(root / name)  # the demo config's relative runs/demo/... paths land here
            for i, steps in enumerate(phases):
                main(_fit_argv(cache, ckpt, steps) + (["--ckpt_path=last"] if i else []))
            out[name] = root / name / "runs" / "demo" / "dit_tcae"
    finally:
        os.chdir(old)
    return out


def test_checkpoint_records_linked_shape_and_resume_is_exact(runs):
    a = torch.load(runs["straight"] / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(runs["resumed"] / "checkpoints" / "last.ckpt", weights_only=True)
    hp = a["hyper_parameters"]
    assert (hp["latent_shape"], hp["num_classes"], hp["dit"]) == ([16, 4, 4], 8, "DiT-T/1")
    assert a["global_step"] == b["global_step"] == 5 and a["images_seen"] == 40
    assert a["latent_cache"]["metadata"]["autoencoder"]["name"] == "TC-AE-T/p4-c16"
    assert a["state_dict"]["dit.x_embedder.proj.weight"].shape[1] == 16  # in_channels from the cache
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert not any(k.startswith(("autoencoder", "_autoencoder")) for k in a["state_dict"])  # decoder not saved
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert not torch.equal(a["state_dict"]["dit.y_embedder.embedding_table.weight"],
                           a["state_dict"]["ema.module.y_embedder.embedding_table.weight"])
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    log = (runs["straight"] / "metrics.csv").read_text().splitlines()
    assert {"train/loss", "train/lr", "train/images_seen", "train/grad_norm"} <= set(log[0].split(","))
    assert sorted(os.listdir(runs["straight"] / "samples")) == ["step0000002.png", "step0000004.png"]


def test_sampling_uses_ema_weights_and_decodes(runs):
    module = DiffusionModule.load_from_checkpoint(runs["straight"] / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.eval_net is module.ema.module and module.hparams.latent_shape == [16, 4, 4]
    y = torch.tensor([0, 3, 7])
    z = module.sample(y, seed=5, decode=False)
    assert z.shape == (3, 16, 4, 4)
    with torch.no_grad():
        for p in module.dit.parameters():
            p.zero_()  # the online weights do not take part in sampling
    assert torch.equal(module.sample(y, seed=5, decode=False), z)
    with torch.no_grad():
        module.ema.module.final_layer.linear.bias.add_(1.0)
    assert not torch.allclose(module.sample(y, seed=5, decode=False), z)
    x = module.sample(y, seed=5)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_a_learning_rate_changed_on_resume_is_applied_and_said(runs, tmp_path, monkeypatch, caplog):
    """The resumed DiT (5 steps at 5e-4) continued to 7 with lr 2e-4 in its config: steps 5 and 6 train at 2e-4
    (the warm-up is over), the history keeps 5e-4 before, and the change is said once."""
    shutil.copytree(runs["root"] / "resumed", tmp_path / "resumed")
    monkeypatch.chdir(tmp_path / "resumed")
    with caplog.at_level(logging.WARNING, logger="tcae_ldm"):
        main(_fit_argv(runs["cache"], runs["ae"], 7) + ["--model.optimizer.init_args.lr=0.0002", "--ckpt_path=last"])
    said = [r.getMessage() for r in caplog.records if "replaces the checkpoint's" in r.getMessage()]
    assert said == ["optimizer 0: learning rate 0.0002 from this run's config replaces the checkpoint's 0.0005 "
                    "from global step 5 on"]
    with open(tmp_path / "resumed" / "runs" / "demo" / "dit_tcae" / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}
    assert lrs[3] == lrs[4] == pytest.approx(5e-4) and lrs[5] == lrs[6] == pytest.approx(2e-4)


def test_linked_arguments_are_not_repeated():
    with pytest.raises(ValueError, match="come from the latent cache"):
        DiffusionModule(dit="DiT-T/1", dit_args={"in_channels": 4})



def test_ddpm_objective_with_learned_sigma_trains_and_samples(runs, tmp_path, monkeypatch):
    """DiT's recipe through the CLI: DDPM, learned variance (2C output channels), hybrid loss, respaced sampling."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", DEMO, f"--data.cache_dir={runs['cache']}", "--data.expect_image_size=32",
          "--data.expect_autoencoder.name=TC-AE-T/p4-c16", f"--data.expect_autoencoder.path={runs['ae']}",
          "--data.global_batch_size=8", "--model.dit=DiT-T/1",
          "--model.dit_args={class_dropout_prob: 0.1, learn_sigma: true}", "--model.objective=ddpm",
          "--model.objective_args={}", "--model.sampler=ddpm", "--model.sample_steps=4", "--model.warmup_steps=0",
          "--model.sample_every_n_steps=0", callbacks_arg(), "--trainer.log_every_n_steps=1", "--trainer.max_steps=3"])
    run = tmp_path / "runs" / "demo" / "dit_tcae"
    module = DiffusionModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.dit.out_channels == 32 and module.hparams.objective == "ddpm"
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("train/loss")
    losses = torch.tensor([float(r.split(",")[col]) for r in rows if r.split(",")[col]])
    assert len(losses) == 3 and torch.isfinite(losses).all() and (losses > 0).all()  # mse + vb, every step
    from tcae_ldm.metrics.flops import count_call_gmacs  # compute: the hybrid loss on real tensors, counted here

    x, y = torch.randn(8, 16, 4, 4), torch.arange(8)
    per_latent = count_call_gmacs(lambda: module.objective.loss(module.dit, x, y).backward()) / 8
    assert module.compute_gmacs == pytest.approx(3 * 8 * per_latent, rel=1e-12)
    z = module.sample(torch.tensor([0, 5]), seed=1, decode=False, cfg_scale=2.0)
    assert z.shape == (2, 16, 4, 4) and torch.isfinite(z).all()
    assert torch.equal(module.sample(torch.tensor([0, 5]), seed=1, decode=False, cfg_scale=2.0), z)  # seeded
    with pytest.raises(ValueError, match="sampler 'euler' does not fit the ddpm objective"):
        module.sample(torch.tensor([0]), sampler="euler")


def test_bf16_mixed_clips_gradients_with_a_fused_optimizer(runs, tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses gradient clipping for any fused optimizer, bf16 included (where no
    loss scaling happens); the module then clips the true gradients itself, as Lightning's norm clipping does."""
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", DEMO, f"--data.cache_dir={runs['cache']}", "--data.expect_image_size=32",  # fused, clip 1
          "--data.expect_autoencoder.name=TC-AE-T/p4-c16", f"--data.expect_autoencoder.path={runs['ae']}",
          "--data.global_batch_size=8", "--model.dit=DiT-T/1", "--model.sample_every_n_steps=0", callbacks_arg(),
          "--trainer.precision=bf16-mixed", "--trainer.max_steps=2"])
    assert (tmp_path / "runs" / "demo" / "dit_tcae" / "checkpoints" / "last.ckpt").is_file()

    module = DiffusionModule(dit="DiT-T/1", latent_shape=(16, 4, 4), num_classes=8, grad_clip=0.5)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    params = list(module.dit.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    module.configure_gradient_clipping(torch.optim.AdamW(params, fused=True))
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item() == pytest.approx(0.5, rel=1e-5)


def test_training_compute_is_logged_and_survives_the_resume(runs):
    """train/compute_gmacs = steps x batch x (DiT forward + backward of one latent), counted here on real tensors."""
    from tcae_ldm.metrics.flops import count_call_gmacs

    ckpt = torch.load(runs["straight"] / "checkpoints" / "last.ckpt", weights_only=True)
    module = DiffusionModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    x, y = torch.randn(8, 16, 4, 4), torch.arange(8)
    per_latent = count_call_gmacs(lambda: module.objective.loss(module.dit, x, y).backward()) / 8
    resumed = torch.load(runs["resumed"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["compute_gmacs"] == resumed["compute_gmacs"] == pytest.approx(5 * 8 * per_latent, rel=1e-12)
    with open(runs["straight"] / "metrics.csv") as f:
        logged = [float(r["train/compute_gmacs"]) for r in csv.DictReader(f) if r.get("train/compute_gmacs")]
    assert logged == pytest.approx([k * 8 * per_latent for k in range(1, 6)], rel=1e-12)


@pytest.mark.parametrize("debug", [False, True])
def test_a_nan_loss_stops_the_dit_with_its_step_and_keeps_the_last_checkpoint_good(runs, tmp_path, monkeypatch,
                                                                                    capsys, debug):
    """The DiT's loss turns NaN at step 3: the run stops before that update and says the step in one line (the
    traceback only with TCAE_LDM_DEBUG=1); last.ckpt keeps step 3's finite weights, but those are the weights the
    divergence came from (a bit-exact resume would diverge again), so no checkpoint is offered to resume from."""
    monkeypatch.chdir(tmp_path)
    if debug:
        monkeypatch.setenv("TCAE_LDM_DEBUG", "1")
    else:
        monkeypatch.delenv("TCAE_LDM_DEBUG", raising=False)
    real, calls = RectifiedFlow.loss, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(RectifiedFlow, "loss", poisoned)
    argv = ["fit", "--config", DEMO, f"--data.cache_dir={runs['cache']}", "--data.expect_image_size=32",
            "--data.expect_autoencoder.name=TC-AE-T/p4-c16", f"--data.expect_autoencoder.path={runs['ae']}",
            "--data.global_batch_size=8", "--model.dit=DiT-T/1", "--model.sample_every_n_steps=0", callbacks_arg(),
            "--trainer.max_steps=6"]
    last = tmp_path / "runs" / "demo" / "dit_tcae" / "checkpoints" / "last.ckpt"
    if debug:
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3 "):
            run(argv)
    else:
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 1
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert err == ["tcae-ldm fit: error: non-finite loss at step 3 (nan); stopping before the update, so nothing "
                       "bad is saved; no checkpoint of this run was saved before the divergence with finite weights"], err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and len(calls) == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
