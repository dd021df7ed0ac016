"""Objectives: interpolants, losses, ODE accuracy on closed-form flows, CFG, DDPM through diffusers."""
import math

import pytest
import torch

from tcae_ldm.diffusion import DDPM, RectifiedFlow, create_objective
from tcae_ldm.models.dit import create_dit

NULL = 7  # null label used by the closed-form models below


def tiny_dit(**overrides):
    kwargs = dict(input_size=4, in_channels=4, num_classes=4, class_dropout_prob=0.1)
    return create_dit("DiT-T/2", **{**kwargs, **overrides})


def gaussian_flow(mu: float, s: float):
    """Exact velocity for data N(mu, s^2) and noise N(0, 1): the ODE maps noise z to mu + s z."""
    def model_fn(x, t, y):
        t = t.view(-1, 1, 1, 1)
        mean, var = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - mean) - mu
    return model_fn


class LabelModel:
    """Predicts its label as a constant image and records the batches it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(y.clone())
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_interpolant_and_target():
    flow = RectifiedFlow()
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(flow.interpolate(x, noise, torch.zeros(3)), x)  # t = 0 is data
    assert torch.equal(flow.interpolate(x, noise, torch.ones(3)), noise)  # t = 1 is noise
    xt = flow.interpolate(x, noise, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(xt[1], 0.75 * x[1] + 0.25 * noise[1])
    assert torch.equal(flow.target(x, noise), noise - x)


def test_time_sampling():
    torch.manual_seed(0)
    uniform = RectifiedFlow("uniform").sample_t(20000)
    logit = RectifiedFlow("logit_normal").sample_t(20000)
    for t in (uniform, logit):
        assert t.shape == (20000,) and t.min() >= 0 and t.max() <= 1
    assert uniform.std() == pytest.approx(1 / math.sqrt(12), rel=0.05)
    assert logit.mean() == pytest.approx(0.5, abs=0.01) and logit.std() < 0.24  # concentrated mid-path
    with pytest.raises(ValueError, match="logit_normal"):
        RectifiedFlow("cosine")


def test_flow_loss_is_velocity_mse():
    flow = RectifiedFlow()
    x, noise, t, y = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([0.3, 0.8]), torch.zeros(2)
    seen = {}

    def model_fn(xt, tt, yy):
        seen.update(xt=xt, t=tt)
        return torch.zeros(xt.shape[0], 8, *xt.shape[2:])  # extra (sigma) channels are ignored

    loss = flow.loss(model_fn, x, y, noise=noise, t=t)
    assert loss.item() == pytest.approx((noise - x).square().mean().item(), rel=1e-6)
    assert torch.equal(seen["t"], t) and torch.allclose(seen["xt"], flow.interpolate(x, noise, t))


def test_tiny_dit_overfits_few_latents():
    # One latent per class and no label dropout: the conditional velocity is then deterministic, so the
    # loss can fall towards zero rather than to the irreducible variance of a real data set.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading overhead dominates
    try:
        torch.manual_seed(0)
        model = tiny_dit(class_dropout_prob=0.0)
        flow = RectifiedFlow()
        x, y = torch.randn(4, 4, 4, 4).repeat(8, 1, 1, 1), torch.arange(4).repeat(8)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(200):
            loss = flow.loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first / 6, (first, last)


def test_euler_exact_for_point_mass():
    mu = torch.randn(1, 3, 4, 4)
    model_fn = lambda x, t, y: (x - mu) / t.view(-1, 1, 1, 1)  # straight paths: Euler is exact
    noise = torch.randn(2, 3, 4, 4)
    out = RectifiedFlow().sample(model_fn, noise, torch.zeros(2, dtype=torch.long), steps=3)
    assert torch.allclose(out, mu.expand_as(out), atol=1e-5)


def test_heun_beats_euler_on_curved_flow():
    torch.manual_seed(0)
    mu, s = 1.5, 0.2  # s != 1 makes the velocity change along the path
    noise, y = torch.randn(64, 1, 2, 2), torch.zeros(64, dtype=torch.long)
    exact = mu + s * noise
    flow = RectifiedFlow()

    def err(steps, sampler, shift=1.0):
        out = flow.sample(gaussian_flow(mu, s), noise, y, steps=steps, sampler=sampler, shift=shift)
        return (out - exact).abs().max().item()

    euler8, euler16, heun8, heun16 = err(8, "euler"), err(16, "euler"), err(8, "heun"), err(16, "heun")
    assert heun8 < euler8 / 5
    assert 0.4 < euler16 / euler8 < 0.6  # first order: error halves with twice the steps
    assert heun16 / heun8 < 0.35  # second order: close to a quarter
    # This flow curves most near the data (t -> 0), so a shift below 1, which moves steps there, helps.
    assert err(8, "heun", shift=0.5) < heun8 < err(8, "heun", shift=3.0)


def test_timestep_shift():
    plain, shifted = RectifiedFlow.timesteps(10), RectifiedFlow.timesteps(10, shift=3.0)
    assert plain[0] == shifted[0] == 1 and plain[-1] == shifted[-1] == 0
    assert torch.all(shifted[1:-1] > plain[1:-1]) and torch.all(shifted[1:] < shifted[:-1])
    assert torch.allclose(plain, torch.linspace(1, 0, 11))  # no shift by default: evenly spaced


def test_flow_sample_cfg_interval_and_errors():
    model, y = LabelModel(), torch.tensor([1, 2])
    RectifiedFlow().sample(model, torch.zeros(2, 1, 2, 2), y, steps=10, cfg_scale=2.0, null_label=NULL,
                           cfg_interval=(0.0, 0.55))
    assert [len(c) for c in model.calls] == [2] * 5 + [4] * 5  # t = 1.0 .. 0.6 unguided, 0.5 .. 0.1 guided
    with pytest.raises(ValueError, match="null_label"):
        RectifiedFlow().sample(model, torch.zeros(2, 1, 2, 2), y, steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="heun"):
        RectifiedFlow().sample(model, torch.zeros(2, 1, 2, 2), y, steps=2, sampler="rk4")


def test_flow_sample_with_dit_and_cfg():
    model = tiny_dit().eval()
    out = RectifiedFlow().sample(model, torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2]), steps=2,
                                 sampler="heun", cfg_scale=4.0, null_label=model.num_classes)
    assert out.shape == (3, 4, 4, 4) and torch.isfinite(out).all()


def test_create_objective():
    flow = create_objective("flow", time_sampling="logit_normal")
    assert isinstance(flow, RectifiedFlow) and flow.time_sampling == "logit_normal"
    assert isinstance(create_objective("ddpm"), DDPM)
    with pytest.raises(KeyError, match="ddpm"):
        create_objective("edm")



def test_flow_loss_draws_noise_and_time_from_the_seed_and_conditions_on_the_label():
    """Without given noise and t: noise ~ N(0, 1) of x's shape, then t of sample_t(batch), in that order; the model
    sees the labels; extra (learned-sigma) output channels are dropped by channel, with C != H."""
    flow = RectifiedFlow("logit_normal", logit_mean=0.5, logit_std=2.0)
    x, y = torch.randn(3, 2, 5, 5), torch.tensor([4, 0, 2])
    seen = {}

    def model_fn(xt, t, yy):
        seen.update(xt=xt, t=t, y=yy)
        out = torch.zeros(xt.shape[0], 4, *xt.shape[2:])
        out[:, :2] = yy.float().view(-1, 1, 1, 1)        # the velocity channels depend on the label
        out[:, 2:] = 100.0                               # sigma channels: never part of the loss
        return out

    torch.manual_seed(3)
    loss = flow.loss(model_fn, x, y)
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    t = torch.sigmoid(0.5 + 2.0 * torch.randn(3))
    assert torch.allclose(seen["t"], t) and torch.equal(seen["y"], y)
    assert torch.allclose(seen["xt"], flow.interpolate(x, noise, t))
    expected = (y.float().view(-1, 1, 1, 1) - (noise - x)).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_interpolation_keeps_the_latents_dtype():
    x, noise = torch.randn(2, 3, 2, 2).bfloat16(), torch.randn(2, 3, 2, 2).bfloat16()
    assert RectifiedFlow.interpolate(x, noise, torch.tensor([0.3, 0.6])).dtype == torch.bfloat16
