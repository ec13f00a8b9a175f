"""Beta schedules against their defining formulas, written independently here in float64."""

import math

import numpy as np
import pytest

from ddpm.schedules import SCHEDULES, get_beta_schedule

T = 1000


def test_linear_is_the_papers_schedule():
    betas = get_beta_schedule("linear", num_timesteps=T, beta_start=1e-4, beta_end=0.02)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


def test_official_schedules():
    quad = get_beta_schedule("quad", num_timesteps=T, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(
        np.diff(np.sqrt(quad)), (math.sqrt(0.02) - 0.01) / (T - 1), rtol=1e-9
    )
    const = get_beta_schedule("const", num_timesteps=T, beta_end=0.02)
    assert np.all(const == 0.02)
    jsd = get_beta_schedule("jsd", num_timesteps=T)
    np.testing.assert_allclose(jsd, [1 / (T - t) for t in range(T)], rtol=1e-12)
    for name, frac in (("warmup10", 0.1), ("warmup50", 0.5)):
        betas = get_beta_schedule(name, num_timesteps=T, beta_start=1e-4, beta_end=0.02)
        n = int(T * frac)
        np.testing.assert_allclose(betas[:n], 1e-4 + (0.02 - 1e-4) * np.arange(n) / (n - 1))
        assert np.all(betas[n:] == 0.02)


def test_scaled_linear_is_latent_diffusions_schedule():
    """REFERENCE.md: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, term by term."""
    betas = get_beta_schedule("scaled_linear", num_timesteps=T, beta_start=0.00085, beta_end=0.012)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    expected = [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12)


def test_cosine_reproduces_alpha_bar_and_caps_betas():
    betas = get_beta_schedule("cosine", num_timesteps=T)

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    alpha_bar = np.cumprod(1 - betas)
    uncapped = betas < 0.999
    assert uncapped[:-1].all() and betas[-1] == 0.999  # only the last step hits the cap
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(alpha_bar[uncapped], expected[uncapped], rtol=1e-9)


def test_sigmoid():
    betas = get_beta_schedule("sigmoid", num_timesteps=T, beta_start=1e-4, beta_end=0.02)
    x = -6 + 12 * np.arange(T) / (T - 1)
    np.testing.assert_allclose(betas, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), rtol=1e-12)
    assert np.all(np.diff(betas) > 0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_a_valid_diffusion(name):
    betas = get_beta_schedule(name, num_timesteps=T, beta_start=1e-4, beta_end=0.02)
    assert betas.shape == (T,) and np.all((betas > 0) & (betas <= 1))


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("linearr", {}, "unknown beta schedule 'linearr'"),
        ("linear", {"num_timesteps": 0}, "positive integer"),
        ("linear", {"num_timesteps": 10.5}, "positive integer"),
        ("linear", {"beta_start": 0.1, "beta_end": 0.01}, "beta_start <= beta_end"),
        ("quad", {"beta_start": 0.0}, "0 < beta_start"),
        ("const", {"beta_end": 1.5}, "<= 1"),
    ],
)
def test_bad_arguments_raise(name, kwargs, message):
    kwargs = {"num_timesteps": T, **kwargs}
    with pytest.raises(ValueError, match=message):
        get_beta_schedule(name, **kwargs)
