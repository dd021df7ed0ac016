"""AutoencoderTC the rest of the way into diffusers: AutoModel, the scalar scaling_factor pipelines read, the
gradient-checkpointing function diffusers passes, and dynamic-shape compilation across image sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tcae_ldm.models.tcae import create_tcae, scalar_latent_scale
from tests.tiny import REPO


def test_scaling_factor_is_the_pooled_version_of_the_per_channel_statistics(tiny_net_args):
    """(z - shift_factor) * scaling_factor has mean 0 and variance 1 over all channels, for latents whose per-channel
    mean / std are the recorded ones."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5000, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 16).view(-1, 1).double()
    z += torch.linspace(-2, 2, 16).view(-1, 1).double()
    mean, std = z.mean(1), z.std(1, unbiased=False)
    net = create_tcae("TC-AE-T/p4-c16", latents_mean=mean.tolist(), latents_std=std.tolist(), **tiny_net_args)
    scaled = (z - net.config.shift_factor) * net.config.scaling_factor
    assert abs(scaled.mean().item()) < 1e-9 and abs(scaled.var(unbiased=False).item() - 1) < 1e-9
    assert (net.config.shift_factor, net.config.scaling_factor) == scalar_latent_scale(mean.tolist(), std.tolist())
    plain = create_tcae("TC-AE-T/p4-c16", **tiny_net_args)  # no statistics: diffusers' identity defaults
    assert (plain.config.scaling_factor, plain.config.shift_factor) == (1.0, 0.0)
    net.set_latent_stats([0.5] * 16, [2.0] * 16)  # set later (export --cache): the scalars follow
    assert (net.config.shift_factor, net.config.scaling_factor) == (0.5, 0.5)


def test_the_gradient_checkpointing_function_diffusers_passes_is_the_one_used(tiny_net_args):
    net = create_tcae("TC-AE-T/p4-c16", **tiny_net_args).train()
    calls = []

    def counting(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    net.enable_gradient_checkpointing(gradient_checkpointing_func=counting)
    net(torch.rand(1, 3, 32, 32)).sample.mean().backward()
    blocks = sum(len(stage.blocks) for part in (net.encoder, net.decoder) for stage in (part.fine, part.coarse))
    assert calls == ["Block"] * blocks and blocks == 4
    calls.clear()
    net.disable_gradient_checkpointing()
    net(torch.rand(1, 3, 32, 32)).sample.mean().backward()
    assert calls == []


def test_dynamic_compile_does_not_recompile_per_image_size(tiny_net_args):
    """One graph for 32 and 48 px (and a third size), where a patch embedding that specialised the size would
    compile again for each."""
    net = create_tcae("TC-AE-T/p4-c16", **tiny_net_args).eval()
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(lambda x: net(x).sample, backend=counting_backend, dynamic=True)  # encode + decode
    with torch.no_grad():
        for size in (32, 48, 64):
            x = torch.rand(1, 3, size, size)
            assert torch.allclose(run(x), net(x).sample, atol=1e-5)
    torch._dynamo.reset()
    assert len(compiled_graphs) == 1


def test_an_exported_folder_loads_through_diffusers_automodel(tiny_net_args, tmp_path):
    """AutoModel resolves AutoencoderTC from config.json's auto_map (trust_remote_code: the module is the one-line
    tcae.py import that save_pretrained writes), in a fresh process whose module cache is under tmp_path."""
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", latents_mean=[0.1] * 16, latents_std=[2.0] * 16, **tiny_net_args).eval()
    net.save_pretrained(tmp_path / "tc")
    assert json.loads((tmp_path / "tc" / "config.json").read_text())["auto_map"] == {"AutoModel": "tcae.AutoencoderTC"}
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(net.encode(x).latent, tmp_path / "z.pt")
    script = (
        "import sys, torch\nfrom diffusers import AutoModel\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "z = m.encode(torch.load(sys.argv[2])).latent\n"
        "print(type(m).__module__, type(m).__name__, m.config.scaling_factor, torch.equal(z, torch.load(sys.argv[3])))\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tc"), str(tmp_path / "x.pt"),
                          str(tmp_path / "z.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["tcae_ldm.models.tcae", "AutoencoderTC", "0.5", "True"]
    assert "accelerate" not in run.stderr  # low_cpu_mem_usage is declared where accelerate is missing
