"""TC-AE: staged compression geometry, the paper preset's cost, errors at build time, gradients."""
import pytest
import torch

from tcae_ldm.metrics.flops import count_gmacs, count_params
from tcae_ldm.models.tcae import create_tcae


def _meta(name, **kw):
    with torch.device("meta"):
        return create_tcae(name, **kw)


@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("p", [8, 16, 32])
def test_every_patch_size_gives_the_same_8x8_latent(p, staged):
    net = _meta(f"TC-AE-B/p{p}-c128", staged=staged)
    x = torch.empty(2, 3, 256, 256, device="meta")
    feats = net.encoder.forward_features(x)
    fine = 256 // p
    # the intermediate bottleneck cuts tokens by 4 whenever the grid is larger than the latent grid
    coarse = fine // 2 if (staged and fine > 8) else fine
    assert feats["fine"].shape == (2, fine, fine, 768)
    assert feats["coarse"].shape == (2, coarse, coarse, 768)
    assert feats["latent"].shape == (2, 128, 8, 8)
    assert net.decode(feats["latent"]).sample.shape == (2, 3, 256, 256)
    assert net.latent_shape(256) == (128, 8, 8)


def test_paper_preset_cost_and_size():
    """The paper-scale preset stays within the paper's 164 GMACs (encode + decode, one 256x256 image)."""
    net = _meta("TC-AE-B/p8-c128")
    x = torch.empty(1, 3, 256, 256, device="meta")
    gmacs = count_gmacs(net, x)
    assert count_params(net) == 190_676_288
    assert gmacs == pytest.approx(161.58, abs=0.05)
    assert gmacs <= 164
    # the vanilla twin runs all 12 blocks on 1024 tokens: same parameters up to the bottlenecks, far more compute
    vanilla = _meta("TC-AE-B/p8-c128", staged=False)
    assert count_gmacs(vanilla, x) == pytest.approx(214.12, abs=0.05)
    assert abs(count_params(vanilla) - count_params(net)) / count_params(net) < 0.01


def test_compression_ratio_of_paper_preset():
    net = _meta("TC-AE-B/p8-c128")
    c, h, w = net.latent_shape(256)
    assert (256 * 256 * 3) / (c * h * w) == 24.0  # f32c128: 64 tokens of 128 floats


@pytest.mark.parametrize("kw, words", [
    (dict(image_size=250), ["image_size=250", "patch_size=8"]),
    (dict(latent_size=5), ["32x32", "5x5"]),
    (dict(image_size=192, latent_size=8), ["24 / latent grid 8 = 3", "power of 2"]),
    (dict(width=100), ["width=100", "num_heads=12"]),
])
def test_bad_geometry_fails_at_build_naming_the_numbers(kw, words):
    with pytest.raises(ValueError) as err:
        _meta("TC-AE-B/p8-c128", **kw)
    for w in words:
        assert w in str(err.value)


def test_unknown_preset_lists_the_options():
    with pytest.raises(KeyError, match="TC-AE-B/p8-c128"):
        create_tcae("TC-AE-Q/p8-c128")


def test_round_trip_shapes_and_gradients(tiny_net_args):
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", **tiny_net_args)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, z = net(x).sample, net.encode(x).latent
    assert z.shape == (2, 16, 2, 2) and x_rec.shape == x.shape
    x_rec.square().mean().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "mask_token" not in n)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_encoder_accepts_other_crop_sizes_and_masks(pos_embed, tiny_net_args):
    """iBOT feeds local crops and masked views through the same encoder."""
    net = create_tcae("TC-AE-T/p4-c16", pos_embed=pos_embed, cls_token=True, **tiny_net_args)
    x = torch.randn(3, 3, 16, 16)
    feats = net.encoder.forward_features(x, upto="coarse")
    assert feats["fine"].shape == (3, 4, 4, 32) and feats["coarse"].shape == (3, 2, 2, 32)
    assert feats["coarse_cls"].shape == (3, 1, 32)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    masked = net.encoder.forward_features(x, mask=mask, upto="fine")["fine"]
    assert torch.allclose(masked[1:], feats["fine"][1:], atol=1e-6)
    assert not torch.allclose(masked[0], feats["fine"][0])
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        net.encoder.forward_features(torch.randn(1, 3, 18, 18))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_net_args):
    torch.manual_seed(0)
    a = create_tcae("TC-AE-T/p4-c16", **tiny_net_args)
    b = create_tcae("TC-AE-T/p4-c16", grad_checkpointing=True, **tiny_net_args)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        m(x).sample.square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n



def _sincos_positions(pe: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read (row, column) coordinates back off sin-cos embeddings (N, dim) from their lowest frequency band,
    whose phase is below pi over the whole table, so atan2 gives it without wrapping."""
    q = dim // 4
    w = 1.0 / 10000.0 ** ((q - 1) / q)
    y = torch.atan2(pe[:, q - 1], pe[:, 2 * q + q - 1]) / w
    x = torch.atan2(pe[:, 2 * q - 1], pe[:, 3 * q + q - 1]) / w
    return y, x


def test_crops_span_the_whole_position_table():
    """A 224 crop of a 256 model (p8: 28 of 32 positions per side) and a 96 crop (12 of 32) are embedded over the
    whole table, at the sample points of iBOT's interpolate_pos_encoding (bicubic, align_corners=False), not as
    its top-left corner; the model's own size keeps today's table bit for bit."""
    from timm.layers import build_sincos2d_pos_embed

    net = create_tcae("TC-AE-T/p8-c16", image_size=256, latent_size=8, cls_token=True)
    fine, coarse = net.encoder.fine.pos, net.encoder.coarse.pos
    assert (fine.grid, coarse.grid) == (32, 16)
    cpu = torch.device("cpu")
    assert torch.equal(fine(32, 32, torch.float32, cpu)[0], build_sincos2d_pos_embed([32, 32], dim=32))
    assert torch.equal(coarse(16, 16, torch.float32, cpu)[0], build_sincos2d_pos_embed([16, 16], dim=32))
    for crop in (224, 96):
        for pos in (fine, coarse):
            n = crop // 8 if pos is fine else crop // 16
            y, x = _sincos_positions(pos(n, n, torch.float32, cpu)[0], 32)
            # token i sits at (i + 0.5) * grid / n - 0.5: the first and last half-cells of the table, evenly spaced
            want = (torch.arange(n) + 0.5) * pos.grid / n - 0.5
            assert torch.allclose(y.view(n, n)[:, 0], want, atol=2e-3) and torch.allclose(x.view(n, n)[0], want, atol=2e-3)
            assert want[0] < 1 and want[-1] > pos.grid - 2   # spans the table (the old top-left corner: 0 .. n-1)


def test_learned_position_table_is_resized_as_the_reference_does():
    import torch.nn.functional as F

    net = create_tcae("TC-AE-T/p8-c16", image_size=256, latent_size=8, pos_embed="learned")
    pos = net.encoder.fine.pos
    assert pos(32, 32, torch.float32, torch.device("cpu")) is pos.weight  # the model's own size: the table itself
    with torch.no_grad():
        ramp = torch.arange(32.0)
        pos.weight.zero_()
        pos.weight.view(32, 32, 32)[..., 0] = ramp[:, None]   # channel 0 holds the row, channel 1 the column
        pos.weight.view(32, 32, 32)[..., 1] = ramp[None, :]
    table = pos.weight.detach().view(1, 32, 32, 32).permute(0, 3, 1, 2)
    for n in (28, 12):
        got = pos(n, n, torch.float32, torch.device("cpu")).detach().view(n, n, 32)
        ref = F.interpolate(table, size=(n, n), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)[0]
        assert torch.allclose(got, ref, atol=1e-5)
        rows = got[:, n // 2, 0]
        assert rows[0] < 1 and rows[-1] > 30  # the crop's first and last rows read the table's ends


def test_masks_on_the_coarse_grid_cover_whole_coarse_tokens(tiny_net_args):
    net = create_tcae("TC-AE-T/p4-c16", cls_token=True, **tiny_net_args)
    x = torch.randn(2, 3, 32, 32)
    coarse = torch.zeros(2, 4, 4, dtype=torch.bool)
    coarse[0, 1, 2] = True
    fine = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)   # the same cells on the 8x8 patch grid
    a = net.encoder.forward_features(x, mask=coarse, upto="coarse")["coarse"]
    b = net.encoder.forward_features(x, mask=fine, upto="coarse")["coarse"]
    assert torch.equal(a, b)
    assert net.encoder.stage_stride("coarse") == 8 and net.encoder.stage_stride("fine") == 4
    assert net.encoder.stage_norm("coarse") is net.encoder.to_latent.norm
    with pytest.raises(ValueError, match="a 3x3 mask does not tile the 8x8 patch grid"):
        net.encoder.forward_features(x, mask=torch.zeros(2, 3, 3, dtype=torch.bool))


def test_a_diffusers_model_round_trip(tmp_path, tiny_net_args):
    """AutoencoderTC is a diffusers ModelMixin: encode(x).latent, decode(z).sample (tuples with return_dict=False),
    its constructor arguments in config.json, and from_pretrained gives back bitwise-equal outputs."""
    from diffusers import ModelMixin

    from tcae_ldm import AutoencoderTC

    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", cls_token=True, latents_mean=[0.5] * 16, latents_std=[2.0] * 16,
                      **tiny_net_args).eval()
    assert isinstance(net, AutoencoderTC) and isinstance(net, ModelMixin)
    assert net.config.width == 32 and net.config.latent_channels == 16 and net.config.latents_std == [2.0] * 16
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = net.encode(x).latent
        assert torch.equal(net.encode(x, return_dict=False)[0], z) and torch.equal(net.encoder(x), z)
        rec = net.decode(z).sample
        assert torch.equal(net.decode(z, return_dict=False)[0], rec) and torch.equal(net(x).sample, rec)
    net.save_pretrained(tmp_path / "tc")
    assert sorted(p.name for p in (tmp_path / "tc").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                                   "tcae.py"]  # AutoModel's module (auto_map)
    back = AutoencoderTC.from_pretrained(tmp_path / "tc")
    public = lambda m: {k: v for k, v in m.config.items() if not k.startswith("_")}  # noqa: E731
    assert not back.training and public(back) == public(net)
    with torch.no_grad():
        assert torch.equal(back.encode(x).latent, z) and torch.equal(back.decode(z).sample, rec)


def test_latent_statistics_must_match_the_channels(tiny_net_args):
    with pytest.raises(ValueError, match="latents_mean has 3 values for 16 latent channels"):
        create_tcae("TC-AE-T/p4-c16", latents_mean=[0.0] * 3, **tiny_net_args)


def test_diffusers_gradient_checkpointing_switch(tiny_net_args):
    net = create_tcae("TC-AE-T/p4-c16", **tiny_net_args)
    net.enable_gradient_checkpointing()
    assert net.encoder.fine.gradient_checkpointing and net.decoder.coarse.gradient_checkpointing
    net.disable_gradient_checkpointing()
    assert not net.encoder.fine.gradient_checkpointing
