"""Reverse-process samplers, each whole chain compiled as one loop.

Randomness is per example: sample i draws all of its noise from its own key, so a
sample does not depend on the batch it was drawn in, nor on the number of devices.
The rule, shared by every sampler: the starting noise of sample i is
N(0, I) from fold_in(keys[i], T) (T = d.num_timesteps), and the noise of step t
(0-based, of `d`'s own steps) is N(0, I) from fold_in(keys[i], t). `sample_keys` gives
sample i of a run its key, fold_in(rng, i); a train step draws each example's t, noise
and dropout the same way, from its global index.

Every sampler walks the steps of the diffusion it is given: pass one created with
`create_diffusion(..., use_timesteps=ddim_timesteps(T, S))` to sample in S steps.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion as D

# (x_t [B, ...], t [B], noise [B, ...]) -> (x_{t-1}, predicted x_0): one reverse step.
StepFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def sample_keys(rng, indices) -> jax.Array:
    """One key per global index [n]: fold_in(rng, index), independent of device layout."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(indices))


def per_example(rng, indices, draw):
    """draw(key) for key = fold_in(rng, i) of each global index i [n]: one random choice per
    example, the same however the examples are split over devices."""
    return jax.vmap(draw)(sample_keys(rng, indices))


def normal_per_example(keys, shape, data):
    """Standard normal noise [B, *shape], row i drawn from fold_in(keys[i], data)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape))(keys)


def start_noise(d: D.Diffusion, keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The chain's starting noise [B, *shape]: row i from fold_in(keys[i], T)."""
    return normal_per_example(keys, shape, d.num_timesteps)


def _ancestral_step(d: D.Diffusion, denoise_fn: D.DenoiseFn, clip_denoised: bool) -> StepFn:
    """Algorithm 2's step, x_{t-1} = mu_theta(x_t, t) + sigma_t z (`diffusion.p_sample`)."""
    return lambda x, t, noise: D.p_sample(d, denoise_fn, x, t, noise, clip_denoised=clip_denoised)


def reverse_step(
    d: D.Diffusion, denoise_fn: D.DenoiseFn, method: str, *, eta=0.0, clip_denoised: bool = True
) -> StepFn:
    """The reverse step of `method`: 'ddpm' (Algorithm 2) or 'ddim' (eq. 12 with this eta)."""
    if method == "ddpm":
        return _ancestral_step(d, denoise_fn, clip_denoised)
    if method == "ddim":
        return _ddim_step(d, denoise_fn, eta, clip_denoised)
    raise ValueError(f"sampling.method must be 'ddpm' or 'ddim', got {method!r}")


def _x0_and_eps(d: D.Diffusion, denoise_fn: D.DenoiseFn, x, t, clip_denoised: bool):
    """(x0, eps) at (x, t): p_mean_variance's pred_xstart, clipped if asked (so any
    mean_type works), and the eps it implies."""
    out = D.p_mean_variance(
        d, D.model_output(d, denoise_fn, x, t), x, t, clip_denoised=clip_denoised
    )
    return out.pred_xstart, D.predict_eps_from_xstart(d, x, t, out.pred_xstart)


def _ddim_step(d: D.Diffusion, denoise_fn: D.DenoiseFn, eta, clip_denoised: bool) -> StepFn:
    """DDIM's step (Song et al. 2021, eq. 12) from step t to the previous step of `d`.

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z, where x0 is
    p_mean_variance's pred_xstart (clipped if asked, so any mean_type works) and eps is
    recomputed from it. sigma^2 = eta^2 (1 - ab_prev)/(1 - ab) (1 - ab/ab_prev) (eq. 16)
    is eta^2 beta-tilde_t, as 1 - ab/ab_prev is the beta of `d`'s step (respaced or not):
    we take it from the float64-built table rather than cancel 1 - ab_prev in float32.
    """
    # 1 - ab_prev = 1 - ab[t-1], from the table built in float64 (exactly 0 at t = 0).
    one_minus_ab_prev_table = jnp.pad(d.sqrt_one_minus_alphas_cumprod[:-1] ** 2, (1, 0))

    def step(x, t, noise):
        x0, eps = _x0_and_eps(d, denoise_fn, x, t, clip_denoised)
        one_minus_ab_prev = D.extract(one_minus_ab_prev_table, t, x)
        sigma2 = eta**2 * D.extract(d.posterior_variance, t, x)
        x_prev = (
            jnp.sqrt(D.extract(d.alphas_cumprod_prev, t, x)) * x0
            + jnp.sqrt(jnp.maximum(one_minus_ab_prev - sigma2, 0.0)) * eps
            + jnp.sqrt(sigma2) * noise
        )
        return x_prev, x0

    return step


def _run_chain(step: StepFn, keys, x_t, t_start, *, noisy: bool = True, every: int = 0):
    """Steps t = t_start, ..., 0 in one fori_loop, noise by the module's rule.

    Returns x_0 [B, ...] and, when every > 0, the predicted x_0 of the steps with
    t % every == 0 in sampling order [ceil((t_start + 1) / every), B, ...] (else None).
    """
    num_records = -(-(t_start + 1) // every) if every else 0

    def body(i, carry):
        x, record = carry
        t = t_start - i
        noise = normal_per_example(keys, x.shape[1:], t) if noisy else jnp.zeros_like(x)
        x, pred_xstart = step(x, jnp.full(x.shape[:1], t, jnp.int32), noise)
        if every:
            slot = num_records - 1 - t // every
            record = record.at[slot].set(jnp.where(t % every == 0, pred_xstart, record[slot]))
        return x, record

    record = jnp.zeros((num_records,) + x_t.shape, x_t.dtype) if every else None
    return jax.lax.fori_loop(0, t_start + 1, body, (x_t, record))


def _check_start(d, keys, shape, x_t, t_start):
    t_start = d.num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < d.num_timesteps:
        raise ValueError(f"t_start must be in [0, {d.num_timesteps - 1}], got {t_start}")
    if x_t is None:
        x_t = start_noise(d, keys, shape)
    elif x_t.shape != keys.shape[:1] + tuple(shape):
        raise ValueError(f"x_t has shape {x_t.shape}, expected {keys.shape[:1] + tuple(shape)}")
    return x_t, t_start


def ddpm_sample(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    clip_denoised: bool = True,
    x_t: jax.Array | None = None,
    t_start: int | None = None,
) -> jax.Array:
    """Ancestral sampling (Algorithm 2): x_T ~ N(0, I), then T reverse steps in one fori_loop.

    Args:
      keys: [B] one key per sample.
      shape: the shape of one sample, e.g. (H, W, C).
      x_t: [B, *shape] a state at step `t_start` to start from (default: the start noise).
      t_start: the first step to run, a Python int (default T-1); the chain runs
        t_start, ..., 0 (used by `interpolate` to decode from an intermediate x_t).
    Returns:
      x_0 [B, *shape]. Sample i's noise at step t comes from fold_in(keys[i], t).
    """
    x_t, t_start = _check_start(d, keys, shape, x_t, t_start)
    return _run_chain(_ancestral_step(d, denoise_fn, clip_denoised), keys, x_t, t_start)[0]


def ddim_sample(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """DDIM sampling (Song et al. 2021, eq. 12) over the steps of `d`, in one fori_loop.

    eta=0 is the deterministic DDIM (then `keys` only draw x_T; give x_T to decode a
    latent from `ddim_encode`), eta=1 is the ancestral sampler with sigma^2 = beta-tilde.

    Args:
      keys: [B] one key per sample.
      shape: the shape of one sample.
      x_T: [B, *shape] the state at d's last step (default: the start noise).
    Returns:
      x_0 [B, *shape].
    """
    x_T, t_start = _check_start(d, keys, shape, x_T, None)
    # A Python eta == 0 needs no noise: skip drawing it (a traced eta always draws).
    noisy = not (isinstance(eta, int | float) and eta == 0)
    step = _ddim_step(d, denoise_fn, eta, clip_denoised)
    return _run_chain(step, keys, x_T, t_start, noisy=noisy)[0]


def sample(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    keys: jax.Array,
    shape: tuple[int, ...],
    method: str,
    *,
    eta=0.0,
    clip_denoised: bool = True,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """x_0 [B, *shape] from `method`'s chain: 'ddpm' (ancestral) or 'ddim' (with eta).

    x_T: [B, *shape] the state at d's last step (default: the start noise of `keys`).
    """
    if method == "ddpm":
        return ddpm_sample(d, denoise_fn, keys, shape, clip_denoised=clip_denoised, x_t=x_T)
    if method == "ddim":
        return ddim_sample(
            d, denoise_fn, keys, shape, eta=eta, clip_denoised=clip_denoised, x_T=x_T
        )
    raise ValueError(f"sampling.method must be 'ddpm' or 'ddim', got {method!r}")


def ddim_decode(d: D.Diffusion, denoise_fn: D.DenoiseFn, x_T: jax.Array, *, clip_denoised=False):
    """The deterministic DDIM chain from a given x_T [B, ...] to x_0 [B, ...] (eta=0)."""
    step = _ddim_step(d, denoise_fn, 0.0, clip_denoised)
    return _run_chain(step, None, x_T, d.num_timesteps - 1, noisy=False)[0]


def ddim_encode(d: D.Diffusion, denoise_fn: D.DenoiseFn, x0: jax.Array, *, clip_denoised=False):
    """Runs the DDIM ODE (eta=0) forwards: data x0 [B, ...] -> latent x_T [B, ...].

    Step t = 0, ..., T-2 takes x_t to x_{t+1} = sqrt(ab_{t+1}) x0_pred + sqrt(1 - ab_{t+1}) eps,
    with (x0_pred, eps) predicted at (x_t, t) (DDIM section 4.3; improved-diffusion's
    `ddim_reverse_sample`). The data are taken as x_0 at step 0 (alpha_bar_0 ~ 1; the
    exact step from alpha_bar = 1 to alpha_bar_0 would be the identity), and the chain
    stops at step T-1, where `ddim_decode` starts, so decode(encode(x0)) ~ x0 up to the
    ODE's discretisation. Clipping x0_pred makes the map non-invertible: off by default.
    """

    def body(t, x):
        t_b = jnp.full(x.shape[:1], t, jnp.int32)
        x0, eps = _x0_and_eps(d, denoise_fn, x, t_b, clip_denoised)
        return (
            D.extract(d.sqrt_alphas_cumprod, t_b + 1, x) * x0
            + D.extract(d.sqrt_one_minus_alphas_cumprod, t_b + 1, x) * eps
        )

    return jax.lax.fori_loop(0, d.num_timesteps - 1, body, x0)


def ddim_timesteps(num_timesteps: int, num_steps: int, kind: str = "uniform") -> list[int]:
    """The DDIM paper's subsequence tau of {0..T-1} (its code's `skip_type`), sorted.

    uniform: range(0, T, T // S), S steps when S divides T (a few more otherwise, as in
    the DDIM code). quadratic: int(linspace(0, sqrt(0.8 T), S)^2), the DDIM code's
    choice for CIFAR-10; its first steps can repeat (S=50 of T=1000 starts 0, 0, 1, ...),
    and a repeated step is a no-op in the DDIM code (alpha_bar_prev = alpha_bar, sigma = 0),
    so repeats are dropped: 49 distinct steps for S=50, as the DDIM code in effect walks.
    Give the result to `create_diffusion(..., use_timesteps=...)`.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if kind == "uniform":
        return list(range(0, num_timesteps, num_timesteps // num_steps))
    if kind == "quadratic":
        steps = np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2
        return sorted({int(s) for s in steps})
    raise ValueError(f"unknown kind {kind!r}; choose 'uniform' or 'quadratic'")


def ddpm_sample_progressive(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    every: int,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Ancestral sampling that records the predicted x_0 along the way (paper Figure 6).

    The same chain as `ddpm_sample` (same step, same noise, same loop).
    Returns:
      x_0 [B, *shape], and the predicted x_0 at the steps t = (K-1) every, ..., every, 0
      (those with t % every == 0, in sampling order) [K, B, *shape], K = ceil(T / every);
      the last is the prediction of the final step.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    step = _ancestral_step(d, denoise_fn, clip_denoised)
    return _run_chain(step, keys, start_noise(d, keys, shape), d.num_timesteps - 1, every=every)


def interpolate(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    x0_a: jax.Array,
    x0_b: jax.Array,
    keys: jax.Array,
    *,
    t: int,
    lambdas,
    clip_denoised: bool = True,
) -> jax.Array:
    """Interpolation in latent space (paper section 4.3, Figure 8).

    Both images are diffused to step t with the same noise (q_sample, eq. 4, noise of
    pair i from fold_in(keys[i], T), the start-noise rule), the latents are mixed,
    x_t = (1 - lambda) x_t^a + lambda x_t^b, and each mixture is decoded by the ancestral
    chain from t to 0 with the same noise for every lambda (`ddpm_sample(t_start=t)`).

    Args:
      x0_a, x0_b: [B, ...] image pairs in [-1, 1]; keys: [B]; t: a Python int step;
      lambdas: [L] mixing weights.
    Returns:
      [L, B, ...] decoded interpolations.
    """
    shape = x0_a.shape[1:]
    lambdas = jnp.asarray(lambdas, x0_a.dtype)
    t_b = jnp.full(keys.shape[:1], t, jnp.int32)
    noise = start_noise(d, keys, shape)
    x_a, x_b = D.q_sample(d, x0_a, t_b, noise), D.q_sample(d, x0_b, t_b, noise)
    lam = lambdas.reshape((-1,) + (1,) * x_a.ndim)
    latents = (1.0 - lam) * x_a + lam * x_b  # [L, B, ...]
    # One chain over L*B examples; tiling the keys gives every lambda the same noise.
    num = lambdas.shape[0]
    tiled_keys = jnp.tile(keys, num)
    out = ddpm_sample(
        d,
        denoise_fn,
        tiled_keys,
        shape,
        clip_denoised=clip_denoised,
        x_t=latents.reshape((-1,) + shape),
        t_start=t,
    )
    return out.reshape(latents.shape)
