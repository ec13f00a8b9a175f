"""Samplers against independent float64 oracles, closed forms and each other.

Oracles: tests/oracle.py (posterior by Bayes' rule), DDIM's eq. 12 written out in
numpy, and, for Gaussian data x_0 ~ N(MU, SD^2) per dimension with its exact
denoiser, the fact that every sampler is then an affine map plus Gaussian noise,
so the exact law of its output is a float64 recursion of (mean, variance).
The noise rule the samplers document (start noise from fold_in(keys[i], T), step t's
from fold_in(keys[i], t)) is restated here so that chains can be replayed.

float32 tolerances: one chain step is a few float32 operations on O(1) values, so two
float32 routes to the same step agree to ~1e-7; over the 10-50 steps of a chain the
largest gap measured is 4e-6 (float32 against the float64 eq. 12), and we allow 1e-5.
Quantities divided by sqrt(alpha_bar_t) (predicted x_0) get that factor on top.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import Oracle

from ddpm import diffusion as D
from ddpm import samplers as S
from ddpm.schedules import get_beta_schedule

T = 50
BETAS = get_beta_schedule("linear", num_timesteps=T, beta_start=2e-3, beta_end=0.4)
IMG = (4, 4, 3)
MU, SD = 0.1, 0.5  # the Gaussian data set, per dimension


# XLA's CPU backend spends seconds optimising the threefry code of each small chain; its
# LLVM optimisation level changes the speed only (and float32 rounding by an ulp or so).
# Long runs (the Gaussian moments) and the bit-for-bit batch test keep plain jax.jit.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def rule_noise(keys, data, shape):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape))(keys)


def make_toy_eps(betas, xp=jnp):
    """A smooth nonlinear eps model at the model's own timestep, in jax or numpy (float64).

    Its x_0 prediction, 1.2 tanh(0.5 x + 0.15 sin 2x) (1 - 0.3 t/T), stays bounded so that
    unclipped chains stay O(1), and exceeds [-1, 1] so that clipping engages.
    """
    alpha_bar = np.cumprod(1 - np.asarray(betas, np.float64))
    table = alpha_bar if xp is np else jnp.asarray(alpha_bar, jnp.float32)
    num_timesteps = len(alpha_bar)

    def eps(x, model_t):
        model_t = xp.asarray(model_t)
        expand = model_t.shape + (1,) * (x.ndim - model_t.ndim)
        ab = table[model_t].reshape(expand)
        scale = 1.0 - 0.3 * model_t.reshape(expand) / num_timesteps
        x0 = 1.2 * xp.tanh(0.5 * x + 0.15 * xp.sin(2.0 * x)) * scale
        return (x - xp.sqrt(ab) * x0) / xp.sqrt(1 - ab)

    return eps


toy_eps = make_toy_eps(BETAS)


def gaussian_eps(d_full):
    """The exact E[eps | x_t] for data N(MU, SD^2), at the model's (original) timestep."""

    def fn(x, model_t):
        ab = d_full.alphas_cumprod[model_t].reshape(model_t.shape + (1,) * (x.ndim - 1))
        a = jnp.sqrt(ab)
        x0 = MU + a * SD**2 * (x - a * MU) / (ab * SD**2 + 1 - ab)
        return (x - a * x0) / jnp.sqrt(1 - ab)

    return fn


def keys_for(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------
# Step selection.


def test_ddim_timesteps():
    assert S.ddim_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert S.ddim_timesteps(1000, 30) == list(range(0, 1000, 33))  # the DDIM code: 31 steps
    assert S.ddim_timesteps(10, 10) == list(range(10))
    assert S.ddim_timesteps(1000, 10, "quadratic") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    for steps, distinct in ((10, 10), (20, 20), (50, 49), (100, 96)):
        # The DDIM code's sequence, repeats (no-op steps there) dropped.
        code = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2)]
        got = S.ddim_timesteps(1000, steps, "quadratic")
        assert got == sorted(set(code)) and len(got) == distinct
    for bad in [dict(num_steps=0), dict(num_steps=1001), dict(num_steps=10, kind="cosine")]:
        with pytest.raises(ValueError):
            S.ddim_timesteps(**{"num_timesteps": 1000, **bad})


# ---------------------------------------------------------------------------
# DDIM against eq. 12 and against the ancestral sampler.


def numpy_ddim(alpha_bar_full, steps, eps_fn, x, noises, eta, clip):
    """Eq. 12 in float64 over the kept steps; noises[k] is the noise of respaced step k."""
    ab = alpha_bar_full[steps]
    for k in range(len(steps) - 1, -1, -1):
        ab_prev = ab[k - 1] if k > 0 else 1.0
        eps = eps_fn(x, np.full(x.shape[0], steps[k]))
        x0 = (x - np.sqrt(1 - ab[k]) * eps) / np.sqrt(ab[k])
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(ab[k]) * x0) / np.sqrt(1 - ab[k])
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab[k])) * np.sqrt(1 - ab[k] / ab_prev)
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * noises[k]
    return x


@pytest.mark.parametrize("eta, clip", [(0.0, True), (0.5, False), (1.0, True)])
def test_ddim_matches_eq12(eta, clip):
    betas = get_beta_schedule("linear", num_timesteps=200, beta_start=5e-4, beta_end=0.1)
    steps = S.ddim_timesteps(200, 12, "quadratic")
    d = D.create_diffusion(betas, use_timesteps=steps)
    keys = keys_for(4)
    got = fast_jit(
        lambda k: S.ddim_sample(d, make_toy_eps(betas), k, IMG, eta=eta, clip_denoised=clip)
    )(keys)
    noises = [np.asarray(rule_noise(keys, k, IMG), np.float64) for k in range(len(steps))]
    x_T = np.asarray(rule_noise(keys, len(steps), IMG), np.float64)
    want = numpy_ddim(
        Oracle(betas).alpha_bar,
        steps,
        make_toy_eps(betas, np),
        x_T,
        noises,
        eta,
        clip,
    )
    err = max_err(got, want)
    print(f"DDIM (eta {eta}, clip {clip}) vs float64 eq. 12: max abs error {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("respaced", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_is_the_ancestral_sampler_with_beta_tilde(respaced, clip):
    # sigma^2 at eta=1 is beta-tilde_t and the DDIM mean with eps recomputed from the
    # (clipped) x_0 is the posterior mean at that x_0: the same chain, noise for noise.
    steps = S.ddim_timesteps(T, 10) if respaced else None
    d = D.create_diffusion(BETAS, var_type="fixedsmall", use_timesteps=steps)
    keys = keys_for(8)
    run = fast_jit(
        lambda k: (
            S.ddim_sample(d, toy_eps, k, IMG, eta=1.0, clip_denoised=clip),
            S.ddpm_sample(d, toy_eps, k, IMG, clip_denoised=clip),
        )
    )
    ddim, ancestral = run(keys)
    err = max_err(ddim, ancestral)
    print(f"DDIM eta=1 vs ancestral (respaced {respaced}, clip {clip}): max abs error {err:.1e}")
    assert err < 1e-5
    assert np.std(np.asarray(ancestral)) > 0.1  # not a degenerate chain


def test_ddim_uses_pred_xstart_of_any_parameterisation():
    alpha_bar = jnp.asarray(Oracle(BETAS).alpha_bar, jnp.float32)

    def as_(mean_type):  # the same model as toy_eps, re-expressed as x_0 or v
        def model(x, t):
            eps = toy_eps(x, t)
            ab = alpha_bar[t].reshape(t.shape + (1,) * 3)
            x0 = (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
            return x0 if mean_type == "xstart" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

        return model

    def run(keys):
        return [
            S.ddim_sample(D.create_diffusion(BETAS, mean_type=m), model, keys, IMG, eta=0.5)
            for m, model in (("eps", toy_eps), ("xstart", as_("xstart")), ("v", as_("v")))
        ]

    want, *got = fast_jit(run)(keys_for(4))
    # x_0 <-> eps conversions divide by sqrt(alpha_bar), ~0.003 at t = T-1: float32
    # rounding of the model's x_0 there is amplified, and carried into later steps
    # (measured 1.3e-6); allow 1e-5.
    for g in got:
        assert max_err(g, want) < 1e-5


def test_ddim_eta0_is_deterministic_and_encode_decode_inverts():
    betas = get_beta_schedule("linear", num_timesteps=1000)
    d = D.create_diffusion(betas)
    eps_fn = gaussian_eps(d)
    x_T = jax.random.normal(jax.random.key(3), (16, 8))
    a, b, decoded = fast_jit(
        lambda x, k1, k2: (
            S.ddim_sample(d, eps_fn, k1, (8,), x_T=x, clip_denoised=False),
            S.ddim_sample(d, eps_fn, k2, (8,), x_T=x, clip_denoised=False),
            S.ddim_decode(d, eps_fn, x),
        )
    )(x_T, keys_for(16, 1), keys_for(16, 2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, decoded)

    x0 = MU + SD * jax.random.normal(jax.random.key(4), (16, 8))
    roundtrip = fast_jit(lambda x: S.ddim_decode(d, eps_fn, S.ddim_encode(d, eps_fn, x)))
    # For Gaussian data both maps are affine per dimension, x -> g x + h: the exact float64
    # round trip (the ODE's discretisation error: encode evaluates the model at the start
    # of each step, decode at the other end) gives the tolerance; float32 adds < 1e-5
    # (measured 4.5e-6).
    gain, offset = 1.0, 0.0
    alpha_bar = Oracle(betas).alpha_bar
    for t in range(999):  # encode: x_t -> x_{t+1}
        g, h = _ddim_affine(alpha_bar[t], alpha_bar[t + 1])
        gain, offset = g * gain, g * offset + h
    for t in range(999, -1, -1):  # decode: x_t -> x_{t-1}
        g, h = _ddim_affine(alpha_bar[t], alpha_bar[t - 1] if t > 0 else 1.0)
        gain, offset = g * gain, g * offset + h
    want = gain * np.asarray(x0, np.float64) + offset
    # The discretised ODE shrinks a little both ways (Cauchy-Schwarz on each step's
    # coefficients): the exact round trip has gain 0.994 at T = 1000.
    assert 0.99 < gain < 1 and abs(offset) < 1e-3
    got = roundtrip(x0)
    print(
        f"DDIM encode->decode, T = 1000: {max_err(got, want):.1e} from the exact float64 round "
        f"trip (gain {gain:.4f}), {max_err(got, x0):.1e} from the input"
    )
    assert max_err(got, want) < 1e-5
    bound = (1 - gain) * float(np.max(np.abs(x0))) + abs(offset) + 1e-5
    assert max_err(got, x0) < bound


def _ddim_affine(ab, ab_to):
    """The eta=0 step from alpha_bar `ab` to `ab_to` for Gaussian data: x -> g x + h."""
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    k = a * SD**2 / (ab * SD**2 + b**2)  # E[x_0 | x] = MU (1 - k a) + k x
    # x_to = sqrt(ab_to) x0 + sqrt(1 - ab_to) (x - a x0) / b
    c = math.sqrt(ab_to) - math.sqrt(1 - ab_to) * a / b
    return c * k + math.sqrt(1 - ab_to) / b, c * MU * (1 - k * a)


# ---------------------------------------------------------------------------
# Gaussian data: the law of the samples.


def exact_output_law(betas, steps, kind):
    """(mean, variance) of a sampler's output for Gaussian data with the exact denoiser.

    Each step is x -> A x + c + sigma z, with A and c read off the oracle's posterior
    (Bayes' rule) at x_0 = E[x_0 | x_t], or DDIM's eq. 12 with eta = 0.
    """
    ab = Oracle(betas).alpha_bar[steps]
    oracle = Oracle(1 - ab / np.append(1.0, ab[:-1]))  # the respaced chain
    mean, var = 0.0, 1.0
    for t in range(len(steps) - 1, -1, -1):
        if kind == "ddim":
            A, c = _ddim_affine(ab[t], ab[t - 1] if t > 0 else 1.0)
            noise_var = 0.0
        else:
            a = math.sqrt(ab[t])
            k = a * SD**2 / (ab[t] * SD**2 + 1 - ab[t])

            def post_mean(x, a=a, k=k, t=t):
                x = np.array([x])
                return oracle.q_posterior(MU + k * (x - a * MU), x, np.array([t]))[0][0]

            c = post_mean(0.0)
            A = post_mean(1.0) - c
            noise_var = (
                0.0
                if t == 0
                else {
                    "fixedlarge": oracle.betas[t],
                    "fixedsmall": oracle.posterior_variance(t),
                }[kind]
            )
        mean, var = A * mean + c, A**2 * var + noise_var
    return mean, var


@pytest.mark.parametrize(
    "method, var_type, data_rtol",
    [
        # Measured bias of the exact law against N(MU, SD^2) (T=1000 linear): the fixed
        # variances miss the true reverse variance by O(1/T): fixedlarge +0.3%,
        # fixedsmall -1.5%; DDIM's 50-step Euler-like steps shrink it by 11%.
        ("ancestral", "fixedlarge", 0.01),
        ("ancestral", "fixedsmall", 0.03),
        ("ddim50", "fixedlarge", 0.15),
    ],
)
def test_samples_of_a_perfect_gaussian_model(method, var_type, data_rtol):
    betas = get_beta_schedule("linear", num_timesteps=1000)
    steps = list(range(1000)) if method == "ancestral" else S.ddim_timesteps(1000, 50)
    d_full = D.create_diffusion(betas, var_type=var_type)
    d = D.create_diffusion(betas, var_type=var_type, use_timesteps=steps)
    n, dim = 8192, 16
    sampler = S.ddpm_sample if method == "ancestral" else S.ddim_sample
    x = jax.jit(lambda k: sampler(d, gaussian_eps(d_full), k, (dim,), clip_denoised=False))(
        keys_for(n)
    )
    x = np.asarray(x, np.float64)
    mean, var = exact_output_law(
        betas, np.asarray(steps), "ddim" if method == "ddim50" else var_type
    )
    # Monte Carlo, N = n * dim i.i.d. draws: 5 standard errors of the mean (sd / sqrt(N)),
    # of the variance (relative sqrt(2 / N) = 0.4%) and of each correlation (1 / sqrt(n)).
    N = n * dim
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / N)
    assert abs(x.var() / var - 1) < 5 * math.sqrt(2 / N)
    corr = np.corrcoef(x, rowvar=False)[np.triu_indices(dim, 1)]
    assert np.max(np.abs(corr)) < 5 / math.sqrt(n)
    # And against the data themselves, allowing the sampler's own bias (measured above).
    assert abs(x.mean() - MU) < 5 * math.sqrt(var / N) + 1e-3
    assert abs(x.var() / SD**2 - 1) < data_rtol


# ---------------------------------------------------------------------------
# The compiled chain, batches and devices.


def test_compiled_loop_equals_python_loop_and_progressive_records_it():
    d = D.create_diffusion(BETAS)
    keys = keys_for(4)
    # The reference: T jitted p_sample calls in a Python loop, the noise drawn by the rule.
    step = fast_jit(
        lambda x, t: D.p_sample(d, toy_eps, x, jnp.full(4, t), rule_noise(keys, t, IMG))
    )
    x, preds = rule_noise(keys, T, IMG), {}
    for t in range(T - 1, -1, -1):
        x, preds[t] = step(x, t)

    every = 7
    got, (x0, record) = fast_jit(
        lambda k: (
            S.ddpm_sample(d, toy_eps, k, IMG),
            S.ddpm_sample_progressive(d, toy_eps, k, IMG, every=every),
        )
    )(keys)
    assert max_err(got, x) < 1e-5
    assert max_err(x0, got) == 0.0
    assert record.shape == (math.ceil(T / every), 4) + IMG  # t = 49, 42, ..., 7, 0
    recorded = range(every * (record.shape[0] - 1), -1, -every)
    alpha_bar = Oracle(BETAS).alpha_bar
    for j, t in enumerate(recorded):
        # pred x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab): float32 rounding of x_t (~1e-7)
        # is amplified by 1 / sqrt(ab) (~70 at t = 42, where 7e-6 is measured).
        assert max_err(record[j], preds[t]) < 1e-6 / math.sqrt(alpha_bar[t]), t
    assert max_err(record[-1], preds[0]) < 1e-6  # the final step's prediction
    coarse = jax.eval_shape(
        lambda k: S.ddpm_sample_progressive(d, toy_eps, k, IMG, every=T + 5), keys
    )
    assert coarse[1].shape == (1, 4) + IMG


def test_samples_do_not_depend_on_batch_or_devices():
    assert jax.device_count() == 8
    d = D.create_diffusion(BETAS)

    def sample(keys):
        return (
            S.ddpm_sample(d, toy_eps, keys, IMG),
            S.ddim_sample(d, toy_eps, keys, IMG, eta=0.5),
        )

    keys = keys_for(16)
    whole = jax.jit(sample)(keys)
    part = jax.jit(sample)(keys[:4])
    sharded = jax.pmap(sample)(keys.reshape(8, 2))
    # Per example it is the same elementwise float32 program whatever the batch or the
    # device, so rows agree to float32 rounding (measured: bit for bit); allow 1e-6.
    for w, p, s in zip(whole, part, sharded, strict=True):
        assert max_err(p, w[:4]) < 1e-6
        assert max_err(s.reshape(w.shape), w) < 1e-6


def test_interpolate_endpoints_are_the_chains_of_each_image():
    d = D.create_diffusion(BETAS)
    keys = keys_for(3)
    x0_a = jnp.tanh(jax.random.normal(jax.random.key(5), (3,) + IMG))
    x0_b = jnp.tanh(jax.random.normal(jax.random.key(6), (3,) + IMG))
    t = 20
    out = fast_jit(
        lambda a, b, k: S.interpolate(d, toy_eps, a, b, k, t=t, lambdas=[0.0, 0.5, 1.0])
    )(x0_a, x0_b, keys)
    assert out.shape == (3, 3) + IMG
    # Each lambda's latent is q_sample of the mixed image with the start-rule noise
    # (q is linear in x_0), decoded by the ancestral chain from t with the same keys.
    oracle = Oracle(BETAS)
    noise = np.asarray(rule_noise(keys, T, IMG), np.float64)
    chain = fast_jit(lambda x: S.ddpm_sample(d, toy_eps, keys, IMG, x_t=x, t_start=t))
    for row, lam in enumerate((0.0, 0.5, 1.0)):
        x0 = (1 - lam) * np.asarray(x0_a, np.float64) + lam * np.asarray(x0_b, np.float64)
        latent = jnp.asarray(oracle.q_sample(x0, np.full(3, t), noise), jnp.float32)
        assert max_err(out[row], chain(latent)) < 1e-5, lam
    assert max_err(out[0], out[2]) > 0.1
    with pytest.raises(ValueError, match="t_start"):
        S.ddpm_sample(d, toy_eps, keys, IMG, t_start=T)
