"""Reverse-process samplers, each whole chain compiled as one loop.

Randomness is per example: sample i draws all of its noise from its own key, so a
sample does not depend on the batch it was drawn in, nor on the number of devices.
"""

import jax
import jax.numpy as jnp

from ddpm import diffusion as D


def _normal_per_example(keys, shape):
    """Standard normal noise [B, *shape], row i drawn from keys[i]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def ddpm_sample(
    d: D.Diffusion,
    denoise_fn: D.DenoiseFn,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    clip_denoised: bool = True,
) -> jax.Array:
    """Ancestral sampling (Algorithm 2): x_T ~ N(0, I), then T reverse steps in one fori_loop.

    Args:
      keys: [B] one key per sample.
      shape: the shape of one sample, e.g. (H, W, C).
    Returns:
      x_0 [B, *shape]. Sample i's noise at step t comes from fold_in(keys[i], t).
    """
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, d.num_timesteps))(keys)
    batch = keys.shape[:1]

    def step(i, x):
        t = d.num_timesteps - 1 - i
        noise = _normal_per_example(jax.vmap(lambda k: jax.random.fold_in(k, t))(keys), shape)
        x, _ = D.p_sample(
            d, denoise_fn, x, jnp.full(batch, t, jnp.int32), noise, clip_denoised=clip_denoised
        )
        return x

    return jax.lax.fori_loop(0, d.num_timesteps, step, _normal_per_example(init_keys, shape))
