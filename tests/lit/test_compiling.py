"""The `compile` and `channels_last` switches: the `compile` switch of both training modules: in place, so checkpoints keep their keys and the EMA copy
stays an eager module averaging the same parameters. (The eager backend checks the wiring in seconds;
tests/test_bench.py checks that inductor's compiled TC-AE computes what the eager one does.)"""
import shutil

import pytest
import torch

from tcae_ldm.lit.diffusion import DiffusionModule
from tcae_ldm.models.tcae import create_tcae
from tests.tiny import tiny_data, tiny_module, tiny_trainer


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler, none on PATH")
def test_compile_in_place_keeps_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", image_size=32, latent_size=2).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    keys = list(net.state_dict())
    with torch.no_grad():
        ref_rec, ref_z = net(x).sample, net.encode(x).latent
    assert all(k.startswith("_orig_mod.") for k in torch.compile(net).state_dict())  # why a wrapper is avoided
    net.encoder.compile()  # nn.Module.compile: in place, forward compiled on first call
    net.decoder.compile()
    assert list(net.state_dict()) == keys
    with torch.no_grad():
        rec, z = net(x).sample, net.encode(x).latent
    torch.testing.assert_close(z, ref_z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec, ref_rec, rtol=1e-4, atol=1e-5)


EAGER_BACKEND = {"backend": "eager"}


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_autoencoder_compile_keeps_keys_and_trains_with_ema(tmp_path):
    torch.manual_seed(0)
    plain = tiny_module(max_steps=1)
    torch.manual_seed(0)
    module = tiny_module(max_steps=1, compile=EAGER_BACKEND)
    assert _compiled(module.net.encoder) and _compiled(module.net.decoder)
    assert not _compiled(module.ema.module.encoder)             # the EMA copy was made before compiling
    assert list(module.state_dict()) == list(plain.state_dict())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(str(tmp_path))
    trainer.fit(module, tiny_data())
    changed = {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("net.encoder.") for k in changed) and any(k.startswith("ema.module.") for k in changed)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == list(plain.state_dict())  # loadable with compile off
    plain.load_state_dict(ckpt["state_dict"])


def test_dit_compile_keeps_keys_and_leaves_the_sampling_ema_eager():
    kw = dict(dit="DiT-T/1", ema_decay=0.99)
    plain, module = DiffusionModule(**kw), DiffusionModule(**kw, compile=EAGER_BACKEND)
    for m in (plain, module):
        m._build((16, 4, 4), 8)
    assert _compiled(module.dit) and not _compiled(module.ema.module) and not _compiled(plain.dit)
    assert list(module.state_dict()) == list(plain.state_dict())


def test_channels_last_trains_the_same_function(tmp_path):
    """channels_last changes memory layout, not maths: one step gives the same weights up to float reordering."""
    results = []
    for cl in (False, True):
        torch.manual_seed(0)
        module = tiny_module(max_steps=1, channels_last=cl)
        conv = next(p for p in module.loss.discriminator.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == cl
        tiny_trainer(str(tmp_path / str(cl))).fit(module, tiny_data())
        results.append(module.state_dict())
    assert list(results[0]) == list(results[1])
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-3, atol=1e-4, msg=k)



def test_inference_paths_compile_the_frozen_autoencoder(tmp_path, monkeypatch):
    """The cache's encoder and the decoder of DiT samples compile by a config switch, with the same outputs; with
    inductor (the default backend) the weights are frozen into the graphs."""
    from tcae_ldm.latents.frozen import load_autoencoder
    from tcae_ldm.lit.caching import LatentCacheModule
    from tests.tiny import tiny_tcae_checkpoint

    ckpt = tiny_tcae_checkpoint(tmp_path / "ae.ckpt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eager = load_autoencoder("tcae", ckpt)
    cache = LatentCacheModule({"kind": "tcae", "path": ckpt}, compile=EAGER_BACKEND)
    cache.configure_model()
    assert _compiled(cache.autoencoder.model.encoder) and _compiled(cache.autoencoder.model.decoder)
    assert torch.equal(cache.autoencoder.encode(x), eager.encode(x))
    dit = DiffusionModule(dit="DiT-T/1", latent_shape=(16, 4, 4), num_classes=8, compile_decoder=EAGER_BACKEND)
    dit.set_decoder({"kind": "tcae", "path": ckpt})
    z = eager.encode(x)
    assert _compiled(dit.autoencoder.model.decoder) and torch.equal(dit.autoencoder.decode(z), eager.decode(z))
    assert not _compiled(load_autoencoder("tcae", ckpt).compile_(False).model.encoder)

    # inductor (the default backend) traces with its freezing flag on: the weights become constants of the graph
    import torch._inductor.config as inductor_config

    flags = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "forward", lambda t: (
        flags.append(inductor_config.freezing), t)[1]))
    ae = load_autoencoder("tcae", ckpt).compile_(True)
    ae.encode(x)
    ae.decode(z)
    assert flags == [True, True] and not inductor_config.freezing  # only while the calls run
