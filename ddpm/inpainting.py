"""Inpainting with an unconditional model: the replacement method and RePaint.

Masks are 1 where a pixel is known and 0 where it is to be filled. Both methods walk a
list of times over the steps of a (respaced) diffusion `d`:

- replace (the baseline; score_sde's inpainter): t = S-1, ..., 0. At each reverse step
  the known region of x_t is set to q_sample(x_0, t), then an ordinary step is taken.
- repaint (Lugmayr et al. 2022, Algorithm 1, with the resampling schedule of the
  official code): the same reverse step, but after every `jump_length` steps the chain
  goes `jump_length` steps back up with the forward step
  x_{t+1} = sqrt(1 - beta_{t+1}) x_t + sqrt(beta_{t+1}) z (beta of d's respaced chain),
  `jump_n_sample - 1` times at each jump point, so the filled region is harmonised with
  the known one.

The replacement method is RePaint with jump_n_sample = 1. Unlike the official code,
the known region is also set at the very first step (there x_T is nearly pure noise at
either end: sqrt(ab_{T-1}) ~ 0.006 for the linear schedule). The reverse step is any
`samplers.StepFn` (DDPM or DDIM); the final output has the original pasted into the
known region, so known pixels come back exactly.

Noise is per example, by the samplers' rule where the two coincide: x_T from
fold_in(key, T) and the first reverse step at t from fold_in(key, t) (so `replace` with
nothing known is exactly the plain sampler). Every other draw at loop position k comes
from fold_in(fold_in(key, T + s), k): s = 1 the known region's q_sample noise, s = 2 the
noise of undo steps and of reverse steps at a t already visited.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion as D
from ddpm import samplers

METHODS = ("repaint", "replace")
KNOWN_STREAM, RESAMPLE_STREAM = 1, 2  # offsets past T of the extra noise streams


def repaint_times(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time list: num_steps - 1 down to -1, with jumps back up.

    The official code's `get_schedule_jump(t_T, n_sample=1, jump_length, jump_n_sample)`
    (jump2 and jump3 at their defaults of 1, which make no jumps): at each t in
    range(0, num_steps - jump_length, jump_length), reached going down, the chain goes
    back up jump_length steps, jump_n_sample - 1 times. Consecutive entries differ by one:
    a decrease is a reverse step from the earlier time, an increase an undo step.
    """
    for name, value in [("num_steps", num_steps), ("jump_length", jump_length),
                        ("jump_n_sample", jump_n_sample)]:  # fmt: skip
        if int(value) < 1:
            raise ValueError(f"inpaint.{name} must be >= 1, got {value}")
    jumps = {t: jump_n_sample - 1 for t in range(0, num_steps - jump_length, jump_length)}
    t, times = num_steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    times.append(-1)
    return times


def inpaint_times(method: str, num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The time list of `method`: RePaint's, or the plain descent for 'replace'."""
    if method not in METHODS:
        raise ValueError(f"inpaint.method must be one of {METHODS}, got {method!r}")
    if method == "replace":
        return repaint_times(num_steps, 1, 1)
    return repaint_times(num_steps, jump_length, jump_n_sample)


class Plan(NamedTuple):
    """The loop's per-position arrays, from a time list of K + 1 entries."""

    t: np.ndarray  # int32 [K]: the step each position starts from.
    undo: np.ndarray  # bool [K]: a forward step t -> t + 1 (else a reverse step t -> t - 1).
    visit: np.ndarray  # int32 [K]: how many reverse steps from t came before this one.


def plan(times, num_timesteps: int) -> Plan:
    times = np.asarray(times)
    if times[0] != num_timesteps - 1 or times[-1] != -1:
        raise ValueError(f"times must run from {num_timesteps - 1} to -1, got {times[[0, -1]]}")
    if np.any(np.abs(np.diff(times)) != 1):
        raise ValueError("consecutive times must differ by one")
    if np.any(times[:-1] > num_timesteps - 1):
        raise ValueError(f"times must stay below {num_timesteps}")
    t, undo = times[:-1], np.diff(times) > 0
    visit = np.zeros(len(t), np.int32)
    seen: dict[int, int] = {}
    for k in np.flatnonzero(~undo):
        visit[k] = seen.get(int(t[k]), 0)
        seen[int(t[k])] = visit[k] + 1
    return Plan(t.astype(np.int32), undo, visit)


def undo_step(d: D.Diffusion, x, t, noise):
    """One forward step from step t [B] to t + 1: sqrt(1 - beta_{t+1}) x + sqrt(beta_{t+1}) z."""
    beta = D.extract(d.betas, t + 1, x)
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise


def inpaint(
    d: D.Diffusion,
    step: samplers.StepFn,
    keys: jax.Array,
    x0: jax.Array,
    mask: jax.Array,
    times,
) -> jax.Array:
    """Fills the unknown region of x0 by walking `times` over d's steps, in one fori_loop.

    Args:
      d: the diffusion whose steps `times` index (respaced to the chain's length).
      step: the reverse step, e.g. `samplers.reverse_step(d, denoise_fn, 'ddpm')`.
      keys: [B] one key per image.
      x0: [B, H, W, C] the images in [-1, 1] (their unknown pixels are ignored).
      mask: [B, H, W, 1 or C] 1 where known, 0 where to fill.
      times: a time list from `inpaint_times` (a Python list: it fixes the loop).
    Returns:
      [B, H, W, C]: the known pixels of x0 exactly, the model's fill elsewhere.
    """
    p = plan(times, d.num_timesteps)
    t_of, undo_of, visit_of = (jnp.asarray(a) for a in p)
    shape, batch = x0.shape[1:], x0.shape[:1]
    mask = jnp.asarray(mask, x0.dtype)

    def stream(s):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, d.num_timesteps + s)

    known_keys, resample_keys = stream(KNOWN_STREAM), stream(RESAMPLE_STREAM)

    def reverse(x, k, t):
        t_b = jnp.full(batch, t, jnp.int32)
        # sqrt(ab_t) x0 + sqrt(1 - ab_t) z: a standard deviation, not a variance.
        known = D.q_sample(d, x0, t_b, samplers.normal_per_example(known_keys, shape, k))
        x = mask * known + (1.0 - mask) * x
        noise = jax.lax.cond(
            visit_of[k] == 0,
            lambda: samplers.normal_per_example(keys, shape, t),
            lambda: samplers.normal_per_example(resample_keys, shape, k),
        )
        return step(x, t_b, noise)[0]

    def undo(x, k, t):
        noise = samplers.normal_per_example(resample_keys, shape, k)
        return undo_step(d, x, jnp.full(batch, t, jnp.int32), noise)

    def body(k, x):
        return jax.lax.cond(undo_of[k], undo, reverse, x, k, t_of[k])

    x = jax.lax.fori_loop(0, len(p.t), body, samplers.start_noise(d, keys, shape))
    return mask * x0 + (1.0 - mask) * x
