"""DDPM as DiT trains and samples it (facebookresearch/DiT ``diffusion/``, which is ADM's Gaussian diffusion).

- Linear betas over T = 1000 steps, 1e-4 .. 0.02 (scaled by 1000 / T for other T, as DiT's "linear" schedule),
  every table in float64 and read out in float32.
- Epsilon prediction. A DiT whose output has 2C channels (``learn_sigma``) also predicts its variance as an
  interpolation, in log space, between the posterior variance and beta_t ("learned range", Improved DDPM), and
  trains on the hybrid loss ``MSE(eps) + L_vb``: the variational-bound term (bits per dimension; the decoder NLL
  at t = 0, KL(q || p) elsewhere) sees the predicted mean with its gradient stopped, so it trains only the
  variance. A DiT with C output channels trains on the MSE alone and samples with a fixed variance (ADM's
  ``fixed_large`` by default, as DiT's create_diffusion with sigma_small=False).
- Sampling with S < T steps uses ADM's respacing (space_timesteps): S evenly strided steps that always include
  t = T - 1 and t = 0, and a process whose betas are recomputed from the kept alpha-bars. 250 steps start at
  t = 999 (diffusers' "leading" spacing would start at 996). ``ddpm`` is ancestral sampling, ``ddim`` the
  deterministic DDIM update (eta = 0) on the same respaced steps.

No clipping of predicted x_0 anywhere: latents are not bounded (DiT samples with clip_denoised=False).
The model sees the original step divided by T, i.e. t in [0, 1) like the flow objective; the DiT's
``time_scale`` (1000) turns that back into DiT's integer-step embedding.
diffusers' schedulers are not used: DDPMScheduler has the learned range (variance_type="learned_range"), but its
defaults (fixed_small variance, "leading" spacing) differ from DiT's and it trains nothing (no vb term); the
arithmetic below is the reference's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .guidance import ModelFn, check_cfg, guided_prediction
from .likelihood import discretized_gaussian_log_likelihood, normal_kl

DDPM_SAMPLERS = ("ddpm", "ddim")
FIXED_VARIANCES = ("large", "small")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's "linear" schedule in float64: Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T otherwise."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """ADM's respacing with one section: ``steps`` of the ``num_timesteps`` original steps at a fractional stride
    (T - 1) / (steps - 1) from 0, each rounded, so the last is T - 1. Sorted ascending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot take {steps} sampling steps from a {num_timesteps}-step diffusion process")
    stride = 1.0 if steps == 1 else (num_timesteps - 1) / (steps - 1)
    taken, position = set(), 0.0
    for _ in range(steps):  # accumulated, not i * stride, and Python's round: ADM's exact arithmetic
        taken.add(round(position))
        position += stride
    return sorted(taken)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=list(range(1, x.dim())))


class GaussianProcess:
    """The tables of one discrete Gaussian diffusion process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t)."""

    def __init__(self, betas: torch.Tensor):
        b = betas.to(torch.float64)
        if b.dim() != 1 or not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.num_timesteps = b.numel()
        abar = torch.cumprod(1.0 - b, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0, so its log is clipped there: ADM repeats the t = 1 entry. A one-step
        # process (`sample --steps 1`) has no t = 1 and takes beta_0, the one variance it has (ADM's tables end
        # in an IndexError there); its only step returns the mean, so the samples do not depend on it.
        first = post_var[1:2] if len(b) > 1 else b[:1]
        post_logvar = torch.log(torch.cat([first, post_var[1:]]))
        large_var = torch.cat([first, b[1:]])  # fixed_large, with the same first entry (better NLL at t=0)
        self.tables = {
            "betas": b, "log_betas": torch.log(b), "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(), "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1).sqrt(),
            "posterior_variance": post_var, "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": b * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - b).sqrt() / (1.0 - abar),
            "fixed_large_log_variance": torch.log(large_var),
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tables[name]

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table entries at integer steps t (B,), float32, shaped (B, 1, ..., 1) to broadcast against ``like``."""
        values = self.tables[name].to(t.device)[t].float()
        return values.view(-1, *([1] * (like.dim() - 1)))

    # --- q ----------------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return self.at("sqrt_alphas_cumprod", t, x0) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.at("posterior_mean_coef1", t, xt) * x0 + self.at("posterior_mean_coef2", t, xt) * xt
        return mean, self.at("posterior_variance", t, xt), self.at("posterior_log_variance_clipped", t, xt)

    # --- p ----------------------------------------------------------------------------------------------

    def predict_xstart(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_recip_alphas_cumprod", t, xt) * xt - self.at("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        fixed_variance: str = "large") -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output (B, C or 2C, ...): mean, log_variance, pred_xstart."""
        c = xt.shape[1]
        if out.shape[1] == 2 * c:  # learned range: v in [-1, 1] interpolates log(posterior var) .. log(beta_t)
            eps, v = out[:, :c], out[:, c:]
            frac = (v + 1) / 2
            log_var = frac * self.at("log_betas", t, xt) + (1 - frac) * self.at("posterior_log_variance_clipped", t, xt)
        elif out.shape[1] == c:
            eps = out
            name = "fixed_large_log_variance" if fixed_variance == "large" else "posterior_log_variance_clipped"
            log_var = self.at(name, t, xt).expand_as(xt)
        else:
            raise ValueError(f"the model returned {out.shape[1]} channels for {c}-channel latents: expected {c} "
                             f"(epsilon) or {2 * c} (epsilon and the learned variance, learn_sigma)")
        x0 = self.predict_xstart(xt, t, eps)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0}

    def vb_bits(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The variational-bound term per sample, in bits per dimension: -log p(x_0 | x_1) at t = 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)


class DDPM:
    """DiT's diffusion objective: epsilon MSE (+ the vb term for a learned variance), ancestral / DDIM sampling."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 fixed_variance: str = "large"):
        """fixed_variance: the sampling variance of a DiT without learned sigma: "large" (beta_t, ADM's and DiT's
        default) or "small" (the posterior variance)."""
        if fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"fixed_variance must be one of {FIXED_VARIANCES}, got {fixed_variance!r}")
        self.num_timesteps, self.fixed_variance = num_timesteps, fixed_variance
        self.process = GaussianProcess(linear_betas(num_timesteps, beta_start, beta_end))
        self._respaced: dict[int, tuple[GaussianProcess, torch.Tensor]] = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.process["alphas_cumprod"]

    def model_time(self, steps: torch.Tensor) -> torch.Tensor:
        """Original integer steps (B,) -> the model's time in [0, 1)."""
        return steps.float() / self.num_timesteps

    def respaced(self, steps: int) -> tuple[GaussianProcess, torch.Tensor]:
        """(the process on ``steps`` respaced steps, the original step of each of them (steps,))."""
        if steps not in self._respaced:
            kept = space_timesteps(self.num_timesteps, steps)
            abar = self.alphas_cumprod[kept]
            betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
            self._respaced[steps] = (GaussianProcess(betas), torch.tensor(kept))
        return self._respaced[steps]

    # --- training -------------------------------------------------------------------------------------

    def q_sample(self, x: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """x_t for integer steps (B,) of the training process."""
        return self.process.q_sample(x, steps, noise)

    def terms(self, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None,
              t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample loss terms (B,): mse, vb (learned variance only) and loss = mse + vb; t are integer steps."""
        noise = torch.randn_like(x) if noise is None else noise
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device) if t is None else t
        xt = self.q_sample(x, noise, t)
        out = model_fn(xt, self.model_time(t), y).float()  # fp32 losses, also under bf16 autocast
        x, xt, noise, c = x.float(), xt.float(), noise.float(), x.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :c]).square())}
        if out.shape[1] != c:
            # the vb term trains the variance only: the mean enters with its gradient stopped
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            terms["vb"] = self.process.vb_bits(x, xt, t, self.process.p_mean_variance(frozen, xt, t))
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms

    def loss(self, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar training loss: the batch mean of mse (+ vb), as DiT's train.py takes it."""
        return self.terms(model_fn, x, y, noise, t)["loss"].mean()

    # --- sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        y: torch.Tensor,
        steps: int = 250,
        sampler: str = "ddpm",
        cfg_scale: float = 1.0,
        cfg_interval: Sequence[float] | None = None,
        null_label: int | None = None,
        generator: torch.Generator | None = None,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Denoise from pure noise in ``steps`` respaced steps; cfg_interval is in model time [0, 1).

        The per-step noise of ``ddpm`` comes from ``generator`` (on its own device, then moved), so the samples
        of a seed do not depend on the device. guide_channels: guide only the first k channels (DiT's published
        sampler guides 3 of SD-VAE's 4); the rest of the output, variance included, is the conditional one."""
        if sampler not in DDPM_SAMPLERS:
            raise ValueError(f"sampler must be one of {DDPM_SAMPLERS}, got {sampler!r}")
        check_cfg(cfg_scale, null_label)
        process, original = self.respaced(steps)
        x = noise.float()
        for i in reversed(range(process.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            t_model = self.model_time(original.to(x.device)[t])
            out = guided_prediction(model_fn, x, t_model, y, cfg_scale, null_label, cfg_interval, guide_channels)
            p = process.p_mean_variance(out.float(), x, t, self.fixed_variance)
            if sampler == "ddim":  # eta = 0: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
                abar_prev = process.at("alphas_cumprod_prev", t, x)
                eps = (process.at("sqrt_recip_alphas_cumprod", t, x) * x - p["pred_xstart"]) / \
                    process.at("sqrt_recipm1_alphas_cumprod", t, x)
                x = p["pred_xstart"] * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
            elif i > 0:  # ancestral step; the last one (t = 0) returns the mean
                z = torch.randn(x.shape, generator=generator,
                                device=generator.device if generator is not None else x.device)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z.to(x.device)
            else:
                x = p["mean"]
        return x
