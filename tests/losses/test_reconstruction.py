"""L_rec: one backward for generator and critic, the GAN start, the adaptive weight, fp32 under bf16."""
import pytest
import torch

from tcae_ldm.losses.reconstruction import ReconstructionLoss, ReconstructionLossConfig
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

