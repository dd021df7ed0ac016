"""Trainer settings refused before anything is built: a GPU config without a GPU (with the overrides that run it on
the CPU), and Lightning options the modules cannot honour (with what to use instead)."""
import pytest

from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.config_checks import check_trainer_config, cpu_overrides, unsupported_options
from tcae_ldm.lit.diffusion import DiffusionModule

PAPER = {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "precision": "bf16-mixed"}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)


def _apply(config, overrides):
    words = overrides.split()
    out = dict(config)
    for key, value in zip(words[::2], words[1::2]):
        out[key.removeprefix("--trainer.")] = int(value) if value.isdigit() else value
    return out


@pytest.mark.parametrize("config, expected", [
    (PAPER, "--trainer.accelerator cpu --trainer.precision 32-true --trainer.devices 1 --trainer.strategy auto"),
    ({"accelerator": "cuda", "precision": "32-true", "devices": 1}, "--trainer.accelerator cpu"),
    ({"accelerator": "auto", "precision": "bf16-mixed"}, "--trainer.accelerator cpu --trainer.precision 32-true"),
])
def test_a_gpu_config_gets_the_overrides_that_run_it_on_the_cpu(no_gpu, config, expected):
    assert cpu_overrides(config) == expected
    assert cpu_overrides(_apply(config, expected)) is None  # and they are enough


def test_cpu_configs_and_machines_with_a_gpu_pass(no_gpu, monkeypatch):
    assert cpu_overrides({"accelerator": "cpu", "precision": "bf16-mixed"}) is None  # chosen explicitly
    assert cpu_overrides({"accelerator": "auto", "precision": "32-true"}) is None
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert cpu_overrides(PAPER) is None


def test_options_the_modules_cannot_honour_say_what_to_use_instead():
    assert unsupported_options({"gradient_clip_val": 1.0, "accumulate_grad_batches": 1}, AutoencoderModule) == [
        "trainer.gradient_clip_val=1.0: AutoencoderModule cannot honour it; use model.init_args.grad_clip (norm "
        "clipping per group: encoder, decoder, iBOT heads, critic)"]
    assert unsupported_options({"accumulate_grad_batches": 4}, AutoencoderModule)[0].startswith(
        "trainer.accumulate_grad_batches=4: AutoencoderModule cannot honour it; use a larger "
        "data.init_args.global_batch_size")
    # the DiT clips and accumulates through Lightning, by norm only
    assert unsupported_options({"gradient_clip_val": 1.0, "accumulate_grad_batches": 4}, DiffusionModule) == []
    assert unsupported_options({"gradient_clip_algorithm": "value"}, DiffusionModule) == [
        "trainer.gradient_clip_algorithm=value: DiffusionModule cannot honour it; use model.init_args.grad_clip or "
        "trainer.gradient_clip_val, which clip by norm"]
    assert unsupported_options({"gradient_clip_val": 1.0}, None) == []  # a class of its own: Lightning's checks
    with pytest.raises(ValueError, match="^trainer.gradient_clip_algorithm=value: AutoencoderModule cannot"):
        check_trainer_config({"accelerator": "cpu", "gradient_clip_algorithm": "value"}, AutoencoderModule)
