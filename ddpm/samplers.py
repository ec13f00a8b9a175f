"""Reverse-process samplers, each whole chain compiled as one loop."""

import jax
import jax.numpy as jnp

from ddpm import diffusion as D


def ddpm_sample(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    clip_denoised: bool = True,
) -> jax.Array:
    """Ancestral sampling (Algorithm 2): x_T ~ N(0, I), then T reverse steps in one fori_loop.

    Returns x_0 of `shape` [B, ...]. The noise of step t is drawn from fold_in(rng, t).
    """
    init_rng, step_rng = jax.random.split(rng)
    batch = shape[:1]

    def step(i, x):
        t = d.num_timesteps - 1 - i
        x, _ = D.p_sample(
            d,
            denoise_fn,
            x,
            jnp.full(batch, t, jnp.int32),
            jax.random.fold_in(step_rng, t),
            clip_denoised=clip_denoised,
        )
        return x

    return jax.lax.fori_loop(0, d.num_timesteps, step, jax.random.normal(init_rng, shape))
