"""Every shipped config parses and resolves; the small ones also build their model."""
import glob
import os
import re
import subprocess

import pytest
import torch
import yaml

from tcae_ldm.cli import lightning_main
from tests.tiny import REPO

BASES = {"configs/ablations": "configs/tcae.yaml", "configs/ablations/demo": "configs/demo/tcae.yaml",
         "configs/overlays": "configs/demo/tcae.yaml", "configs/eval.yaml": "configs/tcae.yaml",
         "configs/demo/eval.yaml": "configs/demo/tcae.yaml",
         "configs/dit_on_dcae.yaml": "configs/dit_on_tcae.yaml", "configs/demo/dit_on_dcae.yaml": "configs/demo/dit_on_tcae.yaml",
         "configs/demo/dcae_decoder_ft.yaml": "configs/demo/tcae_decoder_ft.yaml"}
# What the DC-AE DiT overlays may change: the cache they read and where the run is written, nothing else.
CACHE_KEYS = {"data.init_args.cache_dir", "data.init_args.expect_autoencoder.kind", "data.init_args.expect_autoencoder.name",
              "data.init_args.expect_autoencoder.path"}
DIT_OVERLAY_KEYS = {"configs/demo/dit_on_tcae.yaml": CACHE_KEYS | {"trainer.logger.init_args.name"},
                    "configs/dit_on_tcae.yaml": CACHE_KEYS | {"trainer.logger.0.init_args.name",  # CSV and TensorBoard
                                                              "trainer.logger.1.init_args.name"}}


def _cpu_step(path):
    """The CPU demo step that a GPU overlay (configs/demo/gpu/<step>.yaml) scales up, as a config stack."""
    return _stack(os.path.join(REPO, "configs", "demo", os.path.basename(path)))


def _stack(path):
    """Overlays (configs/ablations/..., configs/demo/gpu/...) are used on top of their base config."""
    rel = os.path.relpath(path, REPO)
    if os.path.dirname(rel) == "configs/demo/gpu":  # each GPU overlay scales up the CPU demo step of its name ...
        # ... and a DC-AE step that is an overlay of the TC-AE one stacks on its GPU overlay too (as in the Makefile)
        twin = os.path.basename(rel).replace("dcae", "tcae")
        before = [f"configs/demo/gpu/{twin}"] if twin != os.path.basename(rel) and \
            BASES.get(f"configs/demo/{os.path.basename(rel)}") else []
        return _cpu_step(path) + [a for b in before for a in ("--config", os.path.join(REPO, b))] + ["--config", path]
    base = BASES.get(rel) or BASES.get(os.path.dirname(rel))
    return (["--config", os.path.join(REPO, base)] if base else []) + ["--config", path]


def _subcommand(path):
    return "predict" if "cache_latents" in os.path.basename(path) else "fit"


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def _loggers(resolved: dict) -> list[str]:
    logger = resolved["trainer"].get("logger")
    return [lg["class_path"] for lg in (logger if isinstance(logger, list) else [logger] if logger else [])]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_parses_and_prints(path, capsys):
    """... and every training or evaluation run logs the metrics.csv history that `compare` and `export` read
    (a latent cache run, `predict`, logs nothing)."""
    with pytest.raises(SystemExit) as exit_:
        lightning_main([_subcommand(path), *_stack(path), "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path" in out
    loggers = _loggers(yaml.safe_load(out))
    if _subcommand(path) == "predict":
        assert loggers == []
    else:
        assert "tcae_ldm.lit.history.HistoryCSVLogger" in loggers, loggers


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("base", ["configs/dit_on_tcae.yaml", "configs/demo/dit_on_tcae.yaml"])
def test_dit_on_dcae_is_the_same_run_on_another_cache(base, capsys):
    """"The same DiT and schedule on both latents" is enforced: the resolved configs differ only in the cache."""
    resolved = []
    for stack in ([base], [base, base.replace("dit_on_tcae", "dit_on_dcae")]):
        with pytest.raises(SystemExit):
            lightning_main(["fit", *[a for c in stack for a in ("--config", os.path.join(REPO, c))], "--print_config"])
        resolved.append(_flatten(yaml.safe_load(capsys.readouterr().out)))
    tcae, dcae = resolved
    differ = {k for k in tcae.keys() | dcae.keys() if tcae.get(k) != dcae.get(k)}
    assert differ == DIT_OVERLAY_KEYS[base], differ
    assert dcae["data.init_args.expect_autoencoder.kind"] == "dcae" and "latents_dcae" in dcae["data.init_args.cache_dir"]


GPU_OVERLAYS = [p for p in CONFIGS if os.path.dirname(p).endswith(os.path.join("demo", "gpu"))]


@pytest.mark.parametrize("path", GPU_OVERLAYS, ids=os.path.basename)
def test_gpu_overlays_scale_up_the_cpu_demo_in_place(path, capsys, tmp_path):
    """On a CUDA machine `make demo` stacks configs/demo/gpu/<step>.yaml on configs/demo/<step>.yaml: the step
    moves to the GPU (bf16 where it trains) and keeps its outputs where the next step and make's markers look."""
    resolved = []
    for stack in (_cpu_step(path), _stack(path)):
        with pytest.raises(SystemExit):
            lightning_main([_subcommand(path), *stack, "--print_config"])
        resolved.append(_flatten(yaml.safe_load(capsys.readouterr().out)))
    cpu, gpu = resolved
    assert cpu["trainer.accelerator"] == "cpu" and gpu["trainer.accelerator"] == "gpu"
    assert gpu["trainer.precision"] == ("32-true" if _subcommand(path) == "predict" else "bf16-mixed")
    kept = [k for k in cpu if k.endswith(("logger.init_args.save_dir", "logger.init_args.name", "output_dir",
                                          "default_root_dir", "cache_dir", "autoencoder.path"))]
    assert kept and all(gpu[k] == cpu[k] for k in kept)
    # ... and make's dry run of the whole comparison names it (in the shell test it runs when the step starts).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", "compare-demo", f"RUNS={tmp_path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert f"--config configs/demo/gpu/{os.path.basename(path)}" in dry


@pytest.mark.parametrize("path", [p for p in CONFIGS if "/ablations/" in p or p.endswith(("configs/tcae.yaml",
                                                                                            "tcae_decoder_ft.yaml"))],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_autoencoder_configs_build_their_model(path):
    """Instantiate the module on the meta device (no memory, no init cost): geometry errors surface here."""
    with torch.device("meta"):
        cli = lightning_main([*_stack(path), "--model.init_args.loss.lpips_weight=0",
                              "--model.init_args.metrics_lpips=null", "--model.init_args.metrics_fid=null",
                              "--model.init_args.init_from=null",
                              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                              "--trainer.precision=32-true"], run=False)
    net = cli.model.net
    c, h, w = net.latent_shape()
    assert h == w == net.latent_size


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "demo", "*.yaml"))),
                         ids=os.path.basename)
def test_demo_ablation_twins_train_through_the_cli(path, tmp_path):
    """Each demo twin of the ablation grid trains two steps through the CLI (tiny data, same overlays)."""
    out = str(tmp_path)
    lightning_main(["fit", *_stack(path), "--model.init_args.max_steps=2", "--data.init_args.train_per_class=2",
                    "--data.init_args.val_per_class=1", "--data.init_args.global_batch_size=8",
                    "--model.init_args.metrics_fid=random", "--trainer.check_val_every_n_epoch=1", f"--trainer.logger.init_args.save_dir={out}"])
    name = os.path.splitext(os.path.basename(path))[0]
    ckpt = torch.load(os.path.join(out, f"ablation_{name}", "checkpoints", "last.ckpt"), weights_only=False)
    assert ckpt["step_count"] == 2
    has_ssl = any(k.startswith("ssl.") for k in ckpt["state_dict"])
    assert has_ssl == (name not in ("stc_only", "none"))


@pytest.mark.slow
def test_evaluation_overlay_scores_the_whole_split_beside_the_training_logs(tmp_path):
    """Training's periodic validation covers half the split (limit_val_batches 0.5) and says so in val/rfid_images;
    `test` with configs/eval.yaml covers all of it, writes test/* into <run>/test/ and leaves the run's log alone."""
    import csv

    from tests.tiny import TINY

    common = ["--config", os.path.join(REPO, "configs", "demo", "tcae.yaml"), *TINY, "--data.init_args.val_per_class=2",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]
    lightning_main(["fit", *common, "--model.init_args.max_steps=2", "--trainer.check_val_every_n_epoch=1",
                    "--trainer.limit_val_batches=0.5", "--trainer.num_sanity_val_steps=0"])
    run = tmp_path / "tcae"
    history = (run / "metrics.csv").read_text()
    lightning_main(["test", *common, "--config", os.path.join(REPO, "configs", "demo", "eval.yaml"),
                    "--trainer.limit_val_batches=0.5", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])

    def logged(path, key):
        return [float(r[key]) for r in csv.DictReader(open(path)) if r.get(key)]

    assert logged(run / "metrics.csv", "val/rfid_images") == [8.0]  # half of the 16 validation crops
    assert logged(run / "test" / "metrics.csv", "test/rfid_images") == [16.0]  # all of them
    assert len(logged(run / "test" / "metrics.csv", "test/rfid_random")) == 1
    assert (run / "metrics.csv").read_text() == history


# Keys that only give a config its shape; every other key carries a comment.
STRUCTURE = {"trainer", "model", "data", "init_args", "class_path"}
KEY_LINE = re.compile(r"^\s*(?:- )?([A-Za-z_][\w.]*\+?):(.*)$")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_key_has_a_comment(path):
    """On its line, or on a comment line right above it (for a longer explanation)."""
    lines = open(path).read().splitlines()
    bare = []
    for i, line in enumerate(lines):
        m = KEY_LINE.match(line)
        if m and m.group(1) not in STRUCTURE and "#" not in m.group(2):
            if not (i and lines[i - 1].lstrip().startswith("#") and lines[i - 1].startswith(" ")):
                bare.append(f"line {i + 1}: {line.strip()}")
    assert not bare, "\n".join(bare)


@pytest.mark.parametrize("base", ["configs/tcae.yaml", "configs/demo/dit_on_tcae.yaml", "configs/dit_on_tcae.yaml"])
def test_the_wandb_overlay_adds_a_logger_to_any_run(base, capsys):
    """W&B is appended after the run's own loggers, which keep the run's folder and metrics.csv (wandb itself need
    not be installed to parse the config)."""
    with pytest.raises(SystemExit):
        lightning_main(["fit", "--config", os.path.join(REPO, base), "--config",
                        os.path.join(REPO, "configs", "overlays", "wandb.yaml"), "--print_config"])
    loggers = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in loggers][-1] == "WandbLogger"
    assert loggers[0]["class_path"].endswith(("CSVLogger", "TensorBoardLogger")) and len(loggers) >= 2


# What configs/dcae.yaml (DC-AE with TC-AE's losses) may change in configs/tcae.yaml; every other loss, optimiser,
# schedule, trainer and data key is TC-AE's.
DCAE_CHANGES = {"trainer.logger.0.init_args.name", "trainer.logger.1.init_args.name",  # its own folder: runs/imagenet/dcae
                "model.init_args.net", "model.init_args.net_args",  # DC-AE/f32c32 and its (no) overrides
                "model.init_args.ssl", "data.init_args.views"}  # no iBOT: a conv autoencoder has no token sequence


def test_the_dcae_route_is_tcae_with_another_network():
    tcae, dcae = (yaml.safe_load(open(os.path.join(REPO, "configs", f"{n}.yaml"))) for n in ("tcae", "dcae"))
    flat_t, flat_d = _flatten(tcae), _flatten(dcae)
    differ = {k for k in flat_t.keys() | flat_d.keys() if flat_t.get(k) != flat_d.get(k)}
    owner = {k: [c for c in DCAE_CHANGES if k == c or k.startswith(c + ".")] for k in differ}
    assert not [k for k, c in owner.items() if not c], "differs from configs/tcae.yaml outside DCAE_CHANGES"
    assert {c for cs in owner.values() for c in cs} == DCAE_CHANGES  # each listed change is made
    assert dcae["model"]["init_args"]["net"] == "DC-AE/f32c32"
    assert [lg["init_args"]["name"] for lg in dcae["trainer"]["logger"]] == ["dcae", "dcae"]
    assert dcae["model"]["init_args"]["ssl"] is None and dcae["data"]["init_args"]["views"] is None


# What configs/demo/dcae.yaml may change from configs/demo/tcae.yaml: the network and its arguments, iBOT and its
# views (DC-AE has no token sequence to train them on), and the run's name. Every other key (losses, optimisers,
# schedule, budget, data, trainer, metrics) must be the same, or the comparison compares more than the tokenizer.
DEMO_AE_DIFFERENCES = ("model.init_args.net", "model.init_args.net_args", "model.init_args.ssl",
                       "data.init_args.views", "trainer.logger.init_args.name")


def test_demo_dcae_has_the_losses_optimisers_schedule_and_data_of_the_demo_tcae(capsys):
    resolved = []
    for name in ("tcae", "dcae"):
        with pytest.raises(SystemExit):
            lightning_main(["fit", "--config", os.path.join(REPO, "configs", "demo", f"{name}.yaml"),
                            "--print_config"])
        resolved.append(_flatten(yaml.safe_load(capsys.readouterr().out)))
    tcae, dcae = resolved
    may_differ = lambda key: key.startswith(DEMO_AE_DIFFERENCES)  # noqa: E731
    shared = {k for k in tcae.keys() | dcae.keys() if not may_differ(k)}
    differ = {k: (tcae.get(k, "<missing>"), dcae.get(k, "<missing>")) for k in shared if tcae.get(k) != dcae.get(k)}
    assert not differ, differ
    # The keys the claim is about are among those compared (the comparison cannot pass by comparing nothing).
    for key in ("model.init_args.loss.gan_weight", "model.init_args.loss.lpips_weight",
                "model.init_args.loss.disc_start",
                "model.init_args.optimizer.init_args.lr", "model.init_args.disc_optimizer.init_args.betas.0",
                "model.init_args.max_steps", "model.init_args.warmup_steps", "model.init_args.min_lr_ratio",
                "model.init_args.grad_clip", "model.init_args.ema_decay", "data.init_args.image_size",
                "data.init_args.global_batch_size", "data.init_args.train_per_class", "seed_everything"):
        assert key in shared and key in tcae, key
    assert tcae["model.init_args.net"] != dcae["model.init_args.net"] and dcae["model.init_args.ssl"] is None
