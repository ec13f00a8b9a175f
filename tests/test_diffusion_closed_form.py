"""Closed-form checks: moments of q, and the bound of a perfect model of Gaussian data.

For data x_0 ~ N(mu, s^2) per dimension the whole diffusion is jointly Gaussian, so
the optimal denoiser and every expected VLB term have closed forms:
  x_t = a x_0 + b eps,  a = sqrt(alpha_bar_t),  b = sqrt(1 - alpha_bar_t)
  E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)
  Var[x_0 | x_t] = s^2 b^2 / (a^2 s^2 + b^2)
With the model's mean at the optimal x_0 and variance v, the KL term at t >= 1 is
KL(N(m, bt) || N(m_hat, v)) with m - m_hat = coef1 (x_0 - E[x_0|x_t]) ~ N(0, coef1^2 Var):
  E[L_t] = 0.5 (log(v / bt) - 1 + bt / v + coef1^2 Var[x_0 | x_t] / v)   (nats/dim)
Each per-element term is a scaled chi-square with one degree of freedom, so the Monte
Carlo mean of N of them has relative standard deviation sqrt(2 / N) (a bit more where
the log-ratio part dominates): the tolerances below are five of those.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import diffusion as D
from ddpm.schedules import get_beta_schedule

MU, S = 0.1, 0.3
BATCH, DIM = 8192, 4


def test_q_sample_moments():
    betas = get_beta_schedule("linear", num_timesteps=1000)
    d = D.create_diffusion(betas)
    alpha_bar = np.cumprod(1 - betas)
    n = 200_000
    x0 = jnp.array([0.9, -0.5, 0.0])
    for t in (0, 250, 999):
        noise = jax.random.normal(jax.random.key(t), (n, 3))
        xt = np.asarray(D.q_sample(d, jnp.broadcast_to(x0, (n, 3)), jnp.full(n, t), noise), float)
        std = math.sqrt(1 - alpha_bar[t])
        np.testing.assert_allclose(
            xt.mean(0), math.sqrt(alpha_bar[t]) * np.asarray(x0), atol=5 * std / math.sqrt(n)
        )
        np.testing.assert_allclose(xt.var(0), std**2, rtol=5 * math.sqrt(2 / n))


def gaussian_posterior_x0(alpha_bar, x_t):
    a, b2 = jnp.sqrt(alpha_bar), 1 - alpha_bar
    mean = MU + a * S**2 * (x_t - a * MU) / (alpha_bar * S**2 + b2)
    var = S**2 * b2 / (alpha_bar * S**2 + b2)
    return mean, var


def expected_terms(betas, model_var):
    """Closed-form E[L_t] in bits/dim for t = 1..T-1, with model variance model_var(t)."""
    alpha_bar = np.cumprod(1 - betas)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    t = np.arange(1, len(betas))
    beta_tilde = betas[t] * (1 - alpha_bar_prev[t]) / (1 - alpha_bar[t])
    coef1 = betas[t] * np.sqrt(alpha_bar_prev[t]) / (1 - alpha_bar[t])
    var0 = S**2 * (1 - alpha_bar[t]) / (alpha_bar[t] * S**2 + 1 - alpha_bar[t])
    v = model_var(beta_tilde, coef1, var0)
    nats = 0.5 * (np.log(v / beta_tilde) - 1 + beta_tilde / v + coef1**2 * var0 / v)
    return nats / math.log(2)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge", "learned"])
def test_vlb_of_a_perfect_gaussian_model(var_type):
    betas = get_beta_schedule("linear", num_timesteps=200, beta_start=1e-4, beta_end=0.05)
    loss_type = "kl"
    d = D.create_diffusion(betas, mean_type="eps", var_type=var_type, loss_type=loss_type)

    def denoise_fn(x_t, t):
        ab = d.alphas_cumprod[t][:, None]
        x0_mean, x0_var = gaussian_posterior_x0(ab, x_t)
        eps = (x_t - jnp.sqrt(ab) * x0_mean) / jnp.sqrt(1 - ab)
        if var_type != "learned":
            return eps
        # The true reverse variance: beta-tilde plus the spread of the posterior mean.
        true_var = (
            d.posterior_variance[t][:, None] + d.posterior_mean_coef1[t][:, None] ** 2 * x0_var
        )
        return jnp.concatenate([eps, jnp.broadcast_to(jnp.log(true_var), x_t.shape)], -1)

    x0 = MU + S * jax.random.normal(jax.random.key(0), (BATCH, DIM))
    result = jax.jit(
        lambda x: D.calc_bpd_loop(d, denoise_fn, x, jax.random.key(1), clip_denoised=False)
    )(x0)
    model_var = {
        "fixedsmall": lambda bt, c1, v0: bt,
        "fixedlarge": lambda bt, c1, v0: betas[1:],
        "learned": lambda bt, c1, v0: bt + c1**2 * v0,
    }[var_type]
    want = expected_terms(betas, model_var)
    got = np.asarray(result.terms_bpd, float)[:, 1:].mean(0)
    n = BATCH * DIM
    np.testing.assert_allclose(got, want, rtol=5 * math.sqrt(2 / n) * 1.5)
    np.testing.assert_allclose(got.sum(), want.sum(), rtol=5 * math.sqrt(2 / n))

    # The prior term: E over x_0 of KL(N(a x_0, b^2) || N(0, 1)).
    ab = np.prod(1 - betas)
    prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * (MU**2 + S**2)) / math.log(2)
    # x_0^2 has relative spread sqrt(2) s^2 / (mu^2 + s^2) / sqrt(N) around its mean.
    np.testing.assert_allclose(np.mean(result.prior_bpd), prior, rtol=5 * math.sqrt(2 / n))
