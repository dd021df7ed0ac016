"""DiT's DDPM: schedule, q / posterior / learned-range variance, the hybrid loss, ADM respacing, samplers.

Expected values are computed here independently, in float64 numpy, from the formulas of Ho et al. 2020 and
Nichol & Dhariwal 2021 as DiT's gaussian_diffusion.py evaluates them.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tcae_ldm.diffusion import DDPM
from tcae_ldm.diffusion.ddpm import space_timesteps
from tcae_ldm.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from tcae_ldm.models.dit import create_dit

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])


def tiny_dit(**overrides):
    kwargs = dict(input_size=4, in_channels=4, num_classes=4, class_dropout_prob=0.1)
    return create_dit("DiT-T/2", **{**kwargs, **overrides})


def test_linear_schedule_and_tables_in_float64():
    p = DDPM().process
    assert p["betas"].dtype == torch.float64
    np.testing.assert_allclose(p["betas"].numpy(), BETAS, rtol=1e-12)
    np.testing.assert_allclose(p["alphas_cumprod"].numpy(), ABAR, rtol=1e-12)
    post_var = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
    np.testing.assert_allclose(p["posterior_variance"].numpy(), post_var, rtol=1e-12)
    # log variance: the 0 at t = 0 is replaced by the t = 1 value
    np.testing.assert_allclose(p["posterior_log_variance_clipped"].numpy(),
                               np.log(np.append(post_var[1], post_var[1:])), rtol=1e-12)
    # other T: DiT scales the linear schedule by 1000 / T
    np.testing.assert_allclose(DDPM(num_timesteps=500).process["betas"].numpy(),
                               np.linspace(2e-4, 0.04, 500), rtol=1e-12)


def test_q_sample_and_posterior_at_known_values():
    ddpm = DDPM()
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0, 500, 999])
    xt = ddpm.q_sample(x0, noise, t)
    a = torch.tensor(ABAR[[0, 500, 999]]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert math.isclose(float(a[0]), 1 - 1e-4, rel_tol=1e-7)  # t = 0 is one step of noise, beta_1 = 1e-4

    # q(x_{t-1} | x_t, x_0) by Bayes' rule on two Gaussians: the prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    # times the likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)
    t = torch.tensor([1, 10, 999])
    mean, var, log_var = ddpm.process.q_posterior(x0, xt, t)
    ti = t.numpy()
    prec = 1 / (1 - ABAR_PREV[ti]) + (1 - BETAS[ti]) / BETAS[ti]
    want_var = 1 / prec
    want_mean = want_var[:, None, None, None] * (np.sqrt(ABAR_PREV[ti])[:, None, None, None] * x0.double().numpy()
                                                 / (1 - ABAR_PREV[ti])[:, None, None, None]
                                                 + np.sqrt(1 - BETAS[ti])[:, None, None, None] * xt.double().numpy()
                                                 / BETAS[ti][:, None, None, None])
    np.testing.assert_allclose(var.flatten().numpy(), want_var, rtol=1e-5)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(want_var), rtol=1e-5)
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-4, atol=1e-5)


def test_learned_range_interpolates_between_posterior_and_beta():
    ddpm, c = DDPM(), 2
    xt, t = torch.zeros(2, c, 1, 1), torch.tensor([10, 700])
    eps = torch.zeros(2, c, 1, 1)
    lo = ddpm.process.p_mean_variance(torch.cat([eps, -torch.ones_like(eps)], 1), xt, t)["log_variance"]
    hi = ddpm.process.p_mean_variance(torch.cat([eps, torch.ones_like(eps)], 1), xt, t)["log_variance"]
    mid = ddpm.process.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), xt, t)["log_variance"]
    post_var = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
    np.testing.assert_allclose(lo[:, 0, 0, 0].numpy(), np.log(post_var[[10, 700]]), rtol=1e-6)
    np.testing.assert_allclose(hi[:, 0, 0, 0].numpy(), np.log(BETAS[[10, 700]]), rtol=1e-6)
    torch.testing.assert_close(mid, (lo + hi) / 2)
    fixed = ddpm.process.p_mean_variance(eps, xt, t)["log_variance"]  # C channels: fixed_large = log beta_t
    np.testing.assert_allclose(fixed[:, 0, 0, 0].numpy(), np.log(BETAS[[10, 700]]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"returned 3 channels for 2-channel latents: expected 2 .* or 4"):
        ddpm.process.p_mean_variance(torch.zeros(2, 3, 1, 1), xt, t)


def test_normal_kl_and_discretized_likelihood_at_known_values():
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert float(kl) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)
    # a bin of width 2/255 around 0 under N(0, 0.01^2): the tanh CDF is within 1e-3 of the exact one
    x, s = torch.zeros(1), 0.01
    ll = discretized_gaussian_log_likelihood(x, means=x, log_scales=torch.full_like(x, math.log(s)))
    exact = math.log(norm.cdf(1 / 255 / s) - norm.cdf(-1 / 255 / s))
    assert float(ll) == pytest.approx(exact, abs=2e-3)
    # the end bins are open: at x = -1 the mass below -1 + 1/255 is counted
    edge = discretized_gaussian_log_likelihood(-torch.ones(1), means=-torch.ones(1), log_scales=torch.full((1,), math.log(s)))
    assert float(edge) == pytest.approx(math.log(norm.cdf(1 / 255 / s)), abs=2e-3)


def test_hybrid_loss_values_with_a_perfect_mean():
    """eps = the true noise and v = +1 (variance beta_t): mse = 0, and vb is the KL between the posterior and
    N(posterior mean, beta_t) for t > 0, the decoder NLL of a Gaussian centred on x_0 at t = 0."""
    ddpm = DDPM()
    x0, noise = torch.rand(2, 2, 3, 3) * 2 - 1, torch.randn(2, 2, 3, 3)
    t = torch.tensor([0, 2])  # early steps, where the posterior variance is far from beta_t (a KL well above
    # float32 round-off, which DiT's float32 arithmetic shares)

    def model(xt, t_model, y):
        return torch.cat([noise, torch.ones_like(noise)], 1)

    terms = ddpm.terms(model, x0, torch.zeros(2, dtype=torch.long), noise=noise, t=t)
    assert torch.allclose(terms["mse"], torch.zeros(2))
    post_var = BETAS[2] * (1 - ABAR_PREV[2]) / (1 - ABAR[2])
    kl_bits = 0.5 * (-1 + np.log(BETAS[2]) - np.log(post_var) + post_var / BETAS[2]) / np.log(2)
    assert float(terms["vb"][1]) == pytest.approx(kl_bits, rel=1e-4)
    s = math.sqrt(BETAS[0])  # mean = x_0 exactly at t = 0 (posterior_mean_coef2 = 0, coef1 = 1)
    xs = x0[0].double().numpy()
    lo = np.where(xs < -0.999, -np.inf, (xs - 1 / 255 - xs) / s)
    hi = np.where(xs > 0.999, np.inf, (xs + 1 / 255 - xs) / s)
    nll_bits = -np.log(norm.cdf(hi) - norm.cdf(lo)).mean() / np.log(2)
    assert float(terms["vb"][0]) == pytest.approx(nll_bits, rel=2e-3)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_trains_the_variance_only():
    ddpm = DDPM()
    eps = torch.zeros(1, 2, 2, 2, requires_grad=True)
    v = torch.zeros(1, 2, 2, 2, requires_grad=True)
    x0, noise = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    terms = ddpm.terms(lambda xt, t, y: torch.cat([eps, v], 1), x0, torch.zeros(1), noise=noise, t=torch.tensor([300]))
    g_eps, g_v = torch.autograd.grad(terms["vb"].sum(), [eps, v], allow_unused=True, retain_graph=True)
    assert (g_eps is None or not g_eps.abs().any()) and g_v.abs().sum() > 0
    g_eps = torch.autograd.grad(terms["loss"].sum(), eps)[0]
    torch.testing.assert_close(g_eps, 2 * (eps - noise) / noise.numel())  # the MSE's gradient alone


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_loss_with_tiny_dit(learn_sigma):
    model = tiny_dit(learn_sigma=learn_sigma).train()
    x, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
    terms = DDPM().terms(model, x, y)
    assert ("vb" in terms) == learn_sigma
    loss = terms["loss"].mean()
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_adm_respacing():
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999
    assert set(np.diff(steps)) == {4, 5}  # stride 999 / 249 = 4.012
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 2) == [0, 999]
    with pytest.raises(ValueError, match="cannot take 1001 sampling steps from a 1000-step"):
        space_timesteps(1000, 1001)
    # the respaced process keeps the original alpha-bars at the kept steps
    process, original = DDPM().respaced(250)
    assert original.tolist() == steps
    np.testing.assert_allclose(process["alphas_cumprod"].numpy(), ABAR[steps], rtol=1e-10)


def test_sampling_starts_at_t_999_and_ends_at_0():
    seen = []

    def model_fn(x, t, y):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    DDPM().sample(model_fn, torch.randn(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), steps=250)
    assert len(seen) == 250 and seen[0] == pytest.approx(0.999) and seen[1] == pytest.approx(0.995)
    assert seen[-1] == 0.0


def test_one_ancestral_step_by_hand():
    """Two respaced steps: x_0 = mean(x_1) + exp(log_var / 2) z with the generator's first draw, then the mean."""
    ddpm = DDPM()
    process, original = ddpm.respaced(2)
    x = torch.randn(1, 2, 2, 2)
    eps, v = torch.full_like(x, 0.3), torch.full_like(x, 0.5)
    out = ddpm.sample(lambda x, t, y: torch.cat([eps, v], 1), x, torch.zeros(1, dtype=torch.long), steps=2,
                      generator=torch.Generator().manual_seed(7))
    t1 = torch.tensor([1])
    p = process.p_mean_variance(torch.cat([eps, v], 1), x, t1)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    x_mid = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
    final = process.p_mean_variance(torch.cat([eps, v], 1), x_mid, torch.tensor([0]))["mean"]
    torch.testing.assert_close(out, final)
    # respaced beta_1 = 1 - abar_999 / abar_0
    assert float(process["betas"][1]) == pytest.approx(1 - ABAR[999] / ABAR[0], rel=1e-10)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddpm_samplers_recover_point_mass(sampler):
    # With the exact noise predictor of a point mass mu, both samplers must land on mu.
    torch.manual_seed(0)
    ddpm, mu = DDPM(), torch.randn(1, 3, 4, 4)

    def eps_fn(x, t, y):
        abar = ddpm.alphas_cumprod[(t * ddpm.num_timesteps).round().long()].float().view(-1, 1, 1, 1)
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
    with pytest.raises(ValueError, match="fixed_variance must be one of"):
        DDPM(fixed_variance="medium")


def test_schedule_arguments_reach_the_tables():
    """linear_betas' own defaults are DiT's; DDPM passes its beta range on (both ends)."""
    from tcae_ldm.diffusion.ddpm import linear_betas
    np.testing.assert_allclose(linear_betas(1000).numpy(), BETAS, rtol=1e-12)
    np.testing.assert_allclose(DDPM(beta_start=2e-4, beta_end=0.03).process["betas"].numpy(),
                               np.linspace(2e-4, 0.03, 1000), rtol=1e-12)


def test_process_tables_are_built_in_float64_from_any_betas():
    from tcae_ldm.diffusion.ddpm import GaussianProcess
    b32 = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    low, high = GaussianProcess(b32), GaussianProcess(b32.double())
    for name in ("alphas_cumprod", "posterior_variance", "posterior_mean_coef2"):
        assert low[name].dtype == torch.float64 and torch.equal(low[name], high[name]), name
    GaussianProcess(torch.tensor([0.5, 1.0]))  # beta = 1 is allowed: (0, 1]
    for bad in (torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.5]), torch.tensor([[0.1, 0.2]])):
        with pytest.raises(ValueError, match=r"^betas must be a 1-D sequence in \(0, 1\]$"):
            GaussianProcess(bad)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_one_step_sampling_returns_the_predicted_x0(sampler, learn_sigma):
    """`--steps 1`: the respaced process is the single step t = 999 -> 0, whose output is the predicted x_0
    (posterior coefficients 1 and 0), with either variance."""
    assert space_timesteps(1000, 1) == [0] and space_timesteps(5, 1) == [0]
    with pytest.raises(ValueError, match="cannot take 0 sampling steps from a 1000-step"):
        space_timesteps(1000, 0)
    eps = torch.randn(2, 3, 2, 2)

    def model_fn(x, t, y):
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    ddpm = DDPM()
    process, original = ddpm.respaced(1)
    assert original.tolist() == [0] and process["betas"].tolist() == pytest.approx([1 - ABAR[0]])
    assert torch.isfinite(process["posterior_log_variance_clipped"]).all()
    x = torch.randn(2, 3, 2, 2)
    out = ddpm.sample(model_fn, x, torch.zeros(2, dtype=torch.long), steps=1, sampler=sampler)
    expected = (x - math.sqrt(1 - ABAR[0]) * eps) / math.sqrt(ABAR[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_loss_is_the_batch_mean_of_the_terms_and_random_steps_cover_0_to_T():
    ddpm = DDPM(num_timesteps=20)
    seen = []

    def model_fn(xt, t, y):
        seen.append(t)
        return torch.zeros_like(xt)

    x, noise = torch.randn(300, 2, 1, 1), torch.randn(300, 2, 1, 1)
    torch.manual_seed(0)
    terms = ddpm.terms(model_fn, x, torch.zeros(300), noise=noise)
    y, t_fixed = torch.arange(300) % 3, torch.arange(300) % 20

    def labelled(xt, t, y):
        return xt * y.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

    assert ddpm.loss(labelled, x, y, noise=noise, t=t_fixed) == \
        ddpm.terms(labelled, x, y, noise=noise, t=t_fixed)["loss"].mean()
    assert set(terms) == {"mse", "loss"} and torch.equal(terms["loss"], terms["mse"])  # no vb, nothing added
    torch.manual_seed(0)
    t = torch.randint(0, 20, (300,))
    assert len(seen) == 1 and torch.equal(seen[0], t.float() / 20)  # t ~ U{0, ..., T - 1} per image
    assert set(t.tolist()) == set(range(20))


def test_fixed_small_variance_and_the_two_step_tables():
    """A DiT without learned sigma samples with beta_t ("large", DiT's default) or the clipped posterior variance
    ("small"); a two-step process clips its t = 0 entry with its own t = 1 entry, as any longer one."""
    from tcae_ldm.diffusion.ddpm import GaussianProcess
    x, t = torch.randn(2, 2, 1, 1), torch.tensor([0, 5])
    post_var = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
    small = DDPM(fixed_variance="small").process.p_mean_variance(torch.zeros_like(x), x, t, "small")
    large = DDPM().process.p_mean_variance(torch.zeros_like(x), x, t, "large")
    np.testing.assert_allclose(small["log_variance"][:, 0, 0, 0].numpy(), np.log(post_var[[1, 5]]), rtol=1e-6)
    np.testing.assert_allclose(large["log_variance"][:, 0, 0, 0].numpy(), np.log([post_var[1], BETAS[5]]), rtol=1e-6)
    two = GaussianProcess(torch.tensor([0.1, 0.3], dtype=torch.float64))
    pv1 = 0.3 * (1 - 0.9) / (1 - 0.9 * 0.7)
    np.testing.assert_allclose(two["posterior_log_variance_clipped"].numpy(), np.log([pv1, pv1]), rtol=1e-12)
    np.testing.assert_allclose(two["fixed_large_log_variance"].numpy(), np.log([pv1, 0.3]), rtol=1e-12)
