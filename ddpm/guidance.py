"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of a denoise_fn, and sample labels.

The condition is anything with a leading batch axis: class labels, or a text encoder's
states (latent text-to-image, where the empty prompt is the unconditional input).

The guided prediction is eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null) (their eq. 6).
Libraries that speak of a guidance "scale" s write eps_null + s (eps_y - eps_null): the
same thing with s = 1 + w.

The combination is applied to the network's mean output whatever it predicts (eps, x_0,
x_{t-1} or v): each is an affine function of eps at a given (x_t, t), and the weights
(1 + w) and -w sum to one, so combining the outputs is combining the implied eps.
Learned variance channels are not guided: they come from the conditional pass (as in
diffusers' DiT pipeline).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm import diffusion as D

# (x_t [B, ...], t [B], cond [B, ...]) -> model output [B, ...]: a conditional network
# (cond: class labels [B], or text states [B, L, D]).
ConditionalDenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_denoiser(
    denoise_fn: ConditionalDenoiseFn,
    cond: jax.Array,
    null_cond: jax.Array,
    guidance_scale,
    *,
    mean_channels: int,
) -> D.DenoiseFn:
    """The guided (x_t, t) -> output of a conditional network, for the samplers.

    Args:
      denoise_fn: the conditional network, (x_t, t, cond) -> output [B, H, W, C_out].
      cond: [B, ...] the condition of each example: class labels (the null label for
        unconditional ones), or text states.
      null_cond: [B, ...] (same shape and dtype) the unconditional input: the null label,
        or the empty prompt's text states.
      guidance_scale: w, a float or a traced scalar (changing it does not recompile).
        w = 0 is the conditional model: `lax.cond` then skips the unconditional pass.
      mean_channels: how many leading output channels are the mean prediction (the rest,
        a learned variance, are taken from the conditional pass unguided).
    Returns:
      (x_t, t) -> output [B, H, W, C_out]; the conditional and unconditional passes run as
      one forward pass over the concatenated batch of 2B.
    """
    w = jnp.asarray(guidance_scale, jnp.float32)
    null_cond = jnp.broadcast_to(null_cond, cond.shape).astype(cond.dtype)

    def guided(x, t):
        both = denoise_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, null_cond])
        )
        conditional, unconditional = jnp.split(both, 2)
        mean = (1 + w) * conditional[..., :mean_channels] - w * unconditional[..., :mean_channels]
        return jnp.concatenate([mean, conditional[..., mean_channels:]], axis=-1)

    def denoise(x, t):
        return jax.lax.cond(w == 0, lambda: denoise_fn(x, t, cond), lambda: guided(x, t))

    return denoise


def parse_labels(spec: str, num_classes: int) -> np.ndarray | None:
    """sampling.labels -> the classes to cycle through (int32 [K]), or None for balanced.

    '' is balanced over the classes, 'null' the unconditional label (num_classes), and a
    comma-separated list of class indices those classes in turn.
    """
    spec = str(spec).strip()
    if not spec:
        return None
    if spec == "null":
        return np.array([num_classes], np.int32)
    try:
        classes = np.array([int(part) for part in spec.split(",")], np.int32)
    except ValueError:
        raise ValueError(
            f"sampling.labels={spec!r} must be '', 'null' or comma-separated class indices"
        ) from None
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.size:
        raise ValueError(
            f"sampling.labels={spec!r}: class {bad[0]} is not in [0, {num_classes}) "
            f"(model.num_classes={num_classes})"
        )
    return classes


def sample_labels(spec: str, num_classes: int, indices) -> np.ndarray:
    """The label of each global sample index [n] under sampling.labels=`spec` (int32 [n]).

    Sample i gets classes[i mod K] (balanced: class i mod num_classes): a function of the
    index alone, so labels do not depend on batches, devices or processes.
    """
    classes = parse_labels(spec, num_classes)
    if classes is None:
        classes = np.arange(num_classes, dtype=np.int32)
    return classes[np.asarray(indices) % len(classes)]
