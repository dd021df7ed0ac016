"""L_rec: one backward for generator and critic, the GAN start, the adaptive weight, fp32 under bf16."""
import pytest
import torch
import torch.nn as nn

from tcae_ldm.losses.reconstruction import ReconstructionLoss, ReconstructionLossConfig
from tcae_ldm.models.discriminator import PatchDiscriminator
from tcae_ldm.models.tcae import create_tcae


def _setup(tiny_net_args, **cfg):
    torch.manual_seed(0)
    net = create_tcae("TC-AE-T/p4-c16", **tiny_net_args)
    loss = ReconstructionLoss(ReconstructionLossConfig(lpips_trunk="random", disc_channels=8, disc_layers=2, **cfg))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return net, loss, x


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_generator_loss_sends_no_gradient_to_the_critic_and_the_reverse(tiny_net_args):
    net, loss, x = _setup(tiny_net_args)
    x_rec = net(x).sample
    g, logs = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer)
    g.backward(retain_graph=True)
    assert "gan_g" in logs
    assert all(gr is None for gr in _grads(loss.discriminator))
    assert all(gr is not None for gr in _grads(net.decoder))
    net.zero_grad(set_to_none=True)
    d, d_logs = loss.discriminator_loss(x, x_rec, step=0)
    d.backward()
    assert all(gr is None for gr in _grads(net))
    assert all(gr is not None for gr in _grads(loss.discriminator))
    assert set(d_logs) == {"disc", "logits_real", "logits_fake"}


def test_gan_term_is_off_before_disc_start(tiny_net_args):
    net, loss, x = _setup(tiny_net_args, disc_start=10)
    x_rec = net(x).sample
    g, logs = loss.generator_loss(x, x_rec, step=9, last_layer=net.decoder.last_layer)
    expected = (x - x_rec).abs().mean() + loss.perceptual(x, x_rec)
    assert torch.allclose(g, expected) and "gan_g" not in logs
    assert not loss.gan_active(9) and loss.gan_active(10)


def test_adaptive_weight_balances_gradient_norms(tiny_net_args):
    net, loss, x = _setup(tiny_net_args, gan_weight=1.0)
    x_rec = net(x).sample
    _, logs = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer)
    layer = net.decoder.last_layer
    nll = (x - x_rec).abs().mean() + loss.perceptual(x, x_rec)
    g_gan = -loss.critic(x_rec, frozen=True).mean()
    ratio = (torch.autograd.grad(nll, layer, retain_graph=True)[0].norm()
             / (torch.autograd.grad(g_gan, layer, retain_graph=True)[0].norm() + 1e-4))
    assert logs["gan_weight"] == pytest.approx(ratio.item(), rel=1e-5)


def test_losses_are_fp32_under_bf16_autocast(tiny_net_args):
    net, loss, x = _setup(tiny_net_args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec = net(x).sample
        g, _ = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer)
        d, _ = loss.discriminator_loss(x, x_rec, step=0)
    assert x_rec.dtype == torch.bfloat16 and g.dtype == torch.float32 and d.dtype == torch.float32



def _loud_critic(loss, scale=50.0):
    """Scale the critic's last convolution so its logits spread well past the hinge's +-1."""
    last = [m for m in loss.discriminator.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.normal_(0.0, 1.0)


def test_generator_loss_is_the_weighted_sum_of_its_terms(tiny_net_args):
    """loss = l1_weight * L1 + lpips_weight * LPIPS + gan_weight * w * (-mean critic logit), every weight != 1;
    with the adaptive weight off (or no last layer to measure it at) w = 1; every term logged under its name."""
    for cfg, last in (({"adaptive_gan_weight": False}, True), ({"adaptive_gan_weight": True}, False)):
        net, loss, x = _setup(tiny_net_args, l1_weight=2.0, lpips_weight=0.7, gan_weight=0.3, **cfg)
        _loud_critic(loss)
        x_rec = net(x).sample
        g, logs = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer if last else None)
        l1, lp = (x - x_rec).abs().mean(), loss.load_lpips()(x, x_rec).mean()
        g_gan = -loss.discriminator(x_rec).mean()
        assert lp > 0.01 and g_gan.abs() > 1.0
        assert torch.allclose(g, 2.0 * l1 + 0.7 * lp + 0.3 * g_gan, rtol=1e-6, atol=0)
        assert set(logs) == {"l1", "lpips", "gan_g", "gan_weight"}
        assert torch.allclose(logs["l1"], l1) and torch.allclose(logs["lpips"], lp)
        assert torch.allclose(logs["gan_g"], g_gan) and logs["gan_weight"].item() == pytest.approx(0.3)


def test_adaptive_weight_is_clamped_at_its_maximum(tiny_net_args):
    net, loss, x = _setup(tiny_net_args, gan_weight=0.5)
    x_rec = net(x).sample
    g, logs = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer)
    free = logs["gan_weight"].item() / 0.5
    loss.cfg.max_adaptive_weight = free / 4
    g, logs = loss.generator_loss(x, x_rec, step=0, last_layer=net.decoder.last_layer)
    assert logs["gan_weight"].item() == pytest.approx(0.5 * free / 4, rel=1e-6)
    nll = (x - x_rec).abs().mean() + loss.perceptual(x, x_rec)
    assert torch.allclose(g, nll + 0.5 * (free / 4) * -loss.critic(x_rec).mean(), rtol=1e-6, atol=0)


def test_discriminator_loss_is_the_hinge_on_real_and_fake_logits(tiny_net_args):
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), on logits both inside and outside the margin."""
    net, loss, x = _setup(tiny_net_args)
    _loud_critic(loss)
    x_rec = net(x).sample
    d, logs = loss.discriminator_loss(x, x_rec, step=0)
    real, fake = loss.discriminator(x), loss.discriminator(x_rec)
    for logits in (real, fake):
        assert (logits > 1).any() and (logits < -1).any() and (logits.abs() < 1).any()
    expected = 0.5 * (torch.clamp(1.0 - real, min=0).mean() + torch.clamp(1.0 + fake, min=0).mean())
    assert torch.allclose(d, expected, rtol=1e-6, atol=0)
    assert torch.allclose(logs["disc"], expected, rtol=1e-6, atol=0)
    assert torch.allclose(logs["logits_real"], real.mean()) and torch.allclose(logs["logits_fake"], fake.mean())


def test_config_builds_the_critic_and_lpips_it_names():
    loss = ReconstructionLoss(ReconstructionLossConfig(lpips_trunk="random", disc_channels=8, disc_layers=2,
                                                       disc_norm="batch"))
    reference = PatchDiscriminator(channels=8, num_layers=2, norm="batch")
    assert {k: v.shape for k, v in loss.discriminator.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert loss.lpips is None and loss.load_lpips() is loss.lpips is not None  # built on first use, then kept

    off = ReconstructionLoss(ReconstructionLossConfig(gan_weight=0.0, lpips_weight=0.0))
    x = torch.rand(1, 3, 16, 16)
    assert off.discriminator is None and off.load_lpips() is None and off.perceptual(x, 1 - x).item() == 0.0
    assert not off.gan_active(10 ** 6)
