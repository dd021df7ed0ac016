"""The DDPM objective: schedule, interpolant, loss and samplers."""
import pytest
import torch

from tcae_ldm.diffusion import DDPM
from tcae_ldm.models.dit import create_dit


def tiny_dit(**overrides):
    kwargs = dict(input_size=4, in_channels=4, num_classes=4, class_dropout_prob=0.1)
    return create_dit("DiT-T/2", **{**kwargs, **overrides})


def test_ddpm_schedule_and_interpolant():
    torch.manual_seed(0)
    ddpm = DDPM()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ddpm.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    x, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    xt = ddpm.interpolate(x, noise, torch.tensor([0, 999]))
    # sqrt(1 - abar_0) = 0.01 and sqrt(abar_999) = 0.0064: almost clean first, almost pure noise last.
    assert torch.allclose(xt[0], x[0], atol=0.05) and torch.allclose(xt[1], noise[1], atol=0.05)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_loss_with_tiny_dit(learn_sigma):
    model = tiny_dit(learn_sigma=learn_sigma).train()
    x, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
    loss = DDPM().loss(model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_ddpm_loss_feeds_model_unit_time():
    seen = {}

    def model_fn(xt, t, y):
        seen["t"] = t
        return torch.zeros_like(xt)

    DDPM().loss(model_fn, torch.randn(2, 1, 2, 2), torch.zeros(2), t=torch.tensor([0, 500]))
    assert seen["t"].tolist() == [0.0, 0.5]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddpm_samplers_recover_point_mass(sampler):
    # With the exact noise predictor of a point mass mu, both samplers must land on mu.
    torch.manual_seed(0)
    ddpm, mu = DDPM(), torch.randn(1, 3, 4, 4)

    def eps_fn(x, t, y):
        abar = ddpm.alphas_cumprod[(t * ddpm.num_timesteps).round().long()].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * mu) / (1 - abar).sqrt()

    out = ddpm.sample(eps_fn, torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), steps=10,
                      sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, mu.expand_as(out), atol=1e-3)


def test_ddpm_sample_shape_with_cfg():
    model = tiny_dit(learn_sigma=True).eval()
    out = DDPM().sample(model, torch.randn(2, 4, 4, 4), torch.tensor([0, 3]), steps=4, sampler="ddim",
                        cfg_scale=2.0, null_label=model.num_classes)
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="ddim"):
        DDPM().sample(model, torch.randn(2, 4, 4, 4), torch.tensor([0, 3]), steps=4, sampler="euler")

