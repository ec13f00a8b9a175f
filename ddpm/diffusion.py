"""Gaussian diffusion (Ho, Jain, Abbeel 2020): the schedule as a pytree and pure q/p functions.

Conventions (REFERENCE.md, "The official math, exactly"):
  * timesteps are 0-based, t in {0..T-1}; code index t is the paper's t+1;
  * every table is computed in float64 with numpy and stored as float32;
  * `t` has the batch shape of the data: x [B, ...] goes with t [B] (x [...] with t []),
    so every function works on a batch and under `jax.vmap`.

The math never sees the model. Functions take the model's output, or a
`denoise_fn(x_t, model_t) -> output` closure; for a respaced diffusion `model_t` is
the original timestep that the model was trained on (`timestep_map`).
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
# Targets whose error Min-SNR-gamma weighting is defined for (an x_prev error is not x_0's).
MIN_SNR_MEAN_TYPES = ("eps", "xstart", "v")
LEARNED_VAR_TYPES = ("learned", "learned_range")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class Diffusion:
    """Per-timestep tables [T] (float32, computed in float64) and the model's parameterisation."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    log_betas: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    # fixedlarge: variance beta_t, log-variance log([beta-tilde_1, beta_1, ..., beta_{T-1}]).
    fixedlarge_log_variance: jax.Array
    timestep_map: jax.Array  # int32 [T]: the model's timestep for each of our steps.
    mean_type: str = flax.struct.field(pytree_node=False, default="eps")
    var_type: str = flax.struct.field(pytree_node=False, default="fixedlarge")
    loss_type: str = flax.struct.field(pytree_node=False, default="mse")
    # > 0: Min-SNR-gamma loss weighting of L_simple (Hang et al. 2023); 0: unweighted.
    min_snr_gamma: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def create_diffusion(
    betas: np.ndarray,
    *,
    mean_type: str = "eps",
    var_type: str = "fixedlarge",
    loss_type: str = "mse",
    min_snr_gamma: float = 0.0,
    use_timesteps: Sequence[int] | None = None,
) -> Diffusion:
    """Builds the tables once from float64 betas [T].

    Args:
      betas: the schedule, e.g. from `schedules.get_beta_schedule`.
      mean_type: what the model predicts: 'eps', 'xstart', 'xprev' or 'v'.
      var_type: 'fixedlarge' (sigma^2 = beta), 'fixedsmall' (beta-tilde), 'learned'
        (the model outputs log sigma^2) or 'learned_range' (improved DDPM interpolation).
      loss_type: 'mse' (L_simple), 'kl' (the true bound) or 'hybrid' (improved DDPM).
      min_snr_gamma: > 0 weights the 'mse' loss by Min-SNR-gamma (`min_snr_weight`).
      use_timesteps: respace to this subset of {0..T-1} (improved DDPM, section 4):
        betas are recomputed so the kept steps have the original alpha_bar.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("every beta must lie in (0, 1]")
    for value, allowed, what in (
        (mean_type, MEAN_TYPES, "mean_type"),
        (var_type, VAR_TYPES, "var_type"),
        (loss_type, LOSS_TYPES, "loss_type"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    learned = var_type in LEARNED_VAR_TYPES
    if learned and loss_type == "mse":
        raise ValueError(
            f"var_type {var_type!r} learns the variance, which L_simple cannot train: "
            "use loss_type 'hybrid' or 'kl'"
        )
    if loss_type == "hybrid" and not learned:
        raise ValueError(
            "loss_type 'hybrid' trains a learned variance: "
            "use var_type 'learned' or 'learned_range'"
        )
    if min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma must be >= 0 (0: off), got {min_snr_gamma}")
    if min_snr_gamma and (loss_type != "mse" or mean_type not in MIN_SNR_MEAN_TYPES):
        raise ValueError(
            f"min_snr_gamma weights L_simple of an {', '.join(MIN_SNR_MEAN_TYPES)} model; "
            f"got loss_type {loss_type!r}, mean_type {mean_type!r}"
        )

    timestep_map = np.arange(betas.size)
    if use_timesteps is not None:
        betas, timestep_map = respace_betas(betas, use_timesteps)

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta-tilde_0 is exactly 0, so its log is clipped: index 0 takes beta-tilde_1.
    posterior_variance_floor = posterior_variance[1] if betas.size > 1 else betas[0]
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance_floor, posterior_variance[1:])
    )
    tables = dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        log_betas=np.log(betas),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixedlarge_log_variance=np.log(np.append(posterior_variance_floor, betas[1:])),
    )
    tables = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()}
    return Diffusion(
        **tables,
        timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        min_snr_gamma=float(min_snr_gamma),
    )


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Evenly strided subsets of {0..T-1} (improved DDPM's `space_timesteps`).

    `section_counts` is a list of counts, one per equal section of the T steps
    (e.g. [10, 15, 20]), the same as a comma-separated string ("10,15,20"), or
    "ddimN": the stride-k steps {0, k, 2k, ...} of the DDIM paper, N of them.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} strided steps out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return steps


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas [K] of a diffusion over the kept steps, and their original indices [K].

    beta'_k = 1 - alpha_bar[s_k] / alpha_bar[s_{k-1}], so that alpha_bar'_k = alpha_bar[s_k].
    """
    steps = np.asarray(sorted(set(int(s) for s in use_timesteps)))
    if steps.size == 0 or steps[0] < 0 or steps[-1] >= len(betas):
        raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(betas) - 1}")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[steps]
    new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return new_betas, steps


def extract(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """table[t] shaped to broadcast against x: t [B] and x [B, ...] -> [B, 1, ..., 1]."""
    t = jnp.asarray(t)
    return table[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _mean_over_data(x: jax.Array, t: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axes of t: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(jnp.ndim(t), x.ndim)))


# ---------------------------------------------------------------------------
# The forward process q.


def q_mean_variance(d: Diffusion, x_start: jax.Array, t: jax.Array):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): (mean, var, log_var)."""
    mean = extract(d.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = extract(1.0 - d.alphas_cumprod, t, x_start)
    log_variance = extract(d.log_one_minus_alphas_cumprod, t, x_start)
    return mean, variance, log_variance


def q_sample(d: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return (
        extract(d.sqrt_alphas_cumprod, t, x_start) * x_start
        + extract(d.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(d: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
    """Eqs. 6-7, q(x_{t-1} | x_t, x_0): (mean, beta-tilde_t, clipped log beta-tilde_t)."""
    mean = (
        extract(d.posterior_mean_coef1, t, x_t) * x_start
        + extract(d.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = extract(d.posterior_variance, t, x_t)
    log_variance = extract(d.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


# ---------------------------------------------------------------------------
# Converting between the model's possible targets.


def predict_xstart_from_eps(d: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array):
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 inverted."""
    return (
        extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_xstart(d: Diffusion, x_t: jax.Array, t: jax.Array, x_start: jax.Array):
    """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
    return (extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / extract(
        d.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_xstart_from_xprev(d: Diffusion, x_t: jax.Array, t: jax.Array, xprev: jax.Array):
    """x_0 = (x_{t-1} - coef2 x_t) / coef1, the posterior mean (eq. 7) inverted."""
    coef1 = extract(d.posterior_mean_coef1, t, x_t)
    return (xprev - extract(d.posterior_mean_coef2, t, x_t) * x_t) / coef1


def v_target(d: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
    return (
        extract(d.sqrt_alphas_cumprod, t, x_start) * noise
        - extract(d.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
    )


def predict_xstart_from_v(d: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    return (
        extract(d.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(d.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


# ---------------------------------------------------------------------------
# The reverse process p.


class PMeanVariance(NamedTuple):
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def model_output(d: Diffusion, denoise_fn: DenoiseFn, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Calls the model at its own timestep (the original one if the diffusion is respaced)."""
    return denoise_fn(x_t, d.timestep_map[t])


def p_mean_variance(
    d: Diffusion, output: jax.Array, x_t: jax.Array, t: jax.Array, *, clip_denoised: bool
) -> PMeanVariance:
    """p(x_{t-1} | x_t) from the model's output [B, ..., C] (or [B, ..., 2C] with learned variance).

    For learned variances the last axis holds [mean part, variance part]. The
    predicted x_0 is clipped to [-1, 1] when `clip_denoised` (sampling), and the
    mean is then the posterior mean (eq. 7) at that x_0 — except for 'xprev',
    which predicts the mean itself.
    """
    if d.var_type in LEARNED_VAR_TYPES:
        output, var_output = jnp.split(output, 2, axis=-1)
        if d.var_type == "learned":
            log_variance = var_output
        else:  # learned_range: improved DDPM eq. 15, v in [-1, 1] mapped to [0, 1].
            frac = (var_output + 1.0) / 2.0
            max_log = extract(d.log_betas, t, x_t)
            min_log = extract(d.posterior_log_variance_clipped, t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        variance_table, log_variance_table = {
            "fixedlarge": (d.betas, d.fixedlarge_log_variance),
            "fixedsmall": (d.posterior_variance, d.posterior_log_variance_clipped),
        }[d.var_type]
        variance = jnp.broadcast_to(extract(variance_table, t, x_t), x_t.shape)
        log_variance = jnp.broadcast_to(extract(log_variance_table, t, x_t), x_t.shape)

    def maybe_clip(x):
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if d.mean_type == "xprev":
        pred_xstart = maybe_clip(predict_xstart_from_xprev(d, x_t, t, output))
        mean = output
    else:
        pred_xstart = maybe_clip(
            {
                "eps": lambda: predict_xstart_from_eps(d, x_t, t, output),
                "xstart": lambda: output,
                "v": lambda: predict_xstart_from_v(d, x_t, t, output),
            }[d.mean_type]()
        )
        mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)


def p_sample(
    d: Diffusion,
    denoise_fn: DenoiseFn,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    clip_denoised: bool = True,
):
    """One reverse step, Algorithm 2: returns (x_{t-1}, predicted x_0).

    `noise` ~ N(0, I) has the shape of x_t (the caller draws it, so that it can be
    per example); none is added at t=0.
    """
    out = p_mean_variance(
        d, model_output(d, denoise_fn, x_t, t), x_t, t, clip_denoised=clip_denoised
    )
    nonzero = extract(jnp.arange(d.num_timesteps) > 0, t, x_t)
    return out.mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise, out.pred_xstart


# ---------------------------------------------------------------------------
# Likelihood terms.


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the official code."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats) of data x in [-1, 1] on 256 bins of width 2/255, elementwise.

    The edge bins are open (x < -0.999 takes the whole left tail, x > 0.999 the right),
    and every probability is floored at 1e-12 before the log.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def vb_terms_bpd(
    d: Diffusion,
    output: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool,
):
    """The VLB term L_t in bits/dim [B], and the predicted x_0.

    L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the
    decoder NLL -log p(x_0 | x_1) for t = 0, each a mean over the data dims / ln 2.
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
    p = p_mean_variance(d, output, x_t, t, clip_denoised=clip_denoised)
    kl = _mean_over_data(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance), t)
    decoder_nll = -_mean_over_data(
        discretized_gaussian_log_likelihood(x_start, means=p.mean, log_scales=0.5 * p.log_variance),
        t,
    )
    return jnp.where(jnp.asarray(t) == 0, decoder_nll, kl) / np.log(2.0), p.pred_xstart


def prior_bpd(d: Diffusion, x_start: jax.Array) -> jax.Array:
    """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim [B]; about 1e-5 for the paper's schedule."""
    t = jnp.full(x_start.shape[:1], d.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(d, x_start, t)
    return _mean_over_data(normal_kl(mean, log_variance, 0.0, 0.0), t) / np.log(2.0)


# ---------------------------------------------------------------------------
# Training objectives and the full bound.


def training_losses(
    d: Diffusion, denoise_fn: DenoiseFn, x_start: jax.Array, t: jax.Array, noise: jax.Array
) -> dict[str, jax.Array]:
    """Per-example losses [B] at timesteps t [B]; the caller averages them.

    'mse' is L_simple (eq. 14): the mean squared error against the model's target.
    'kl' is the true bound term L_t in bits/dim. 'hybrid' is improved DDPM's
    L_simple + lambda L_vlb with lambda = 0.001, i.e. mse + vb * T / 1000, where the
    vb term trains only the variance (the mean gets a stop-gradient).
    Returns {'loss', and 'mse' and/or 'vb'}.
    """
    x_t = q_sample(d, x_start, t, noise)
    output = model_output(d, denoise_fn, x_t, t)
    if d.loss_type == "kl":
        vb, _ = vb_terms_bpd(d, output, x_start, x_t, t, clip_denoised=False)
        return {"loss": vb, "vb": vb}

    mean_output = jnp.split(output, 2, axis=-1)[0] if d.var_type in LEARNED_VAR_TYPES else output
    target = {
        "eps": lambda: noise,
        "xstart": lambda: x_start,
        "xprev": lambda: q_posterior_mean_variance(d, x_start, x_t, t)[0],
        "v": lambda: v_target(d, x_start, t, noise),
    }[d.mean_type]()
    mse = _mean_over_data((target - mean_output) ** 2, t)
    if d.loss_type == "mse":
        loss = mse * min_snr_weight(d, t) if d.min_snr_gamma else mse
        return {"loss": loss, "mse": mse}
    var_output = jnp.split(output, 2, axis=-1)[1]
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
    vb, _ = vb_terms_bpd(d, frozen, x_start, x_t, t, clip_denoised=False)
    vb = vb * d.num_timesteps / 1000.0
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def min_snr_weight(d: Diffusion, t: jax.Array) -> jax.Array:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023, eq. 7) for the model's target.

    The x_0 error is weighted by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t).
    Since |eps - eps_hat|^2 = SNR_t |x_0 - x_0_hat|^2 and |v - v_hat|^2 =
    (SNR_t + 1) |x_0 - x_0_hat|^2, that is min(SNR_t, gamma) / SNR_t on the eps error and
    min(SNR_t, gamma) / (SNR_t + 1) on the v error.
    """
    snr = 1.0 / jnp.square(d.sqrt_recipm1_alphas_cumprod[t])  # the table is SNR^(-1/2)
    clipped = jnp.minimum(snr, d.min_snr_gamma)
    return {"eps": clipped / snr, "xstart": clipped, "v": clipped / (snr + 1.0)}[d.mean_type]


class BpdResult(NamedTuple):
    total_bpd: jax.Array  # [B]: the negative VLB in bits/dim.
    terms_bpd: jax.Array  # [B, T]: L_t for every t (L_0 is the decoder NLL).
    prior_bpd: jax.Array  # [B]
    mse: jax.Array  # [B, T]: the mean squared error of the predicted x_0 at every t.


def calc_bpd_loop(
    d: Diffusion, denoise_fn: DenoiseFn, x_start: jax.Array, rng: jax.Array, *, clip_denoised=True
) -> BpdResult:
    """The full variational bound in bits/dim over all T steps, compiled as one scan.

    Each L_t is evaluated at a fresh x_t ~ q(x_t | x_0) (noise from fold_in(rng, t)).
    As in the official evaluation, the predicted x_0 is clipped by default.
    """
    batch = x_start.shape[:1]

    def term(_, t):
        t_b = jnp.full(batch, t, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, t), x_start.shape, x_start.dtype)
        x_t = q_sample(d, x_start, t_b, noise)
        output = model_output(d, denoise_fn, x_t, t_b)
        vb, pred_xstart = vb_terms_bpd(d, output, x_start, x_t, t_b, clip_denoised=clip_denoised)
        return None, (vb, _mean_over_data((pred_xstart - x_start) ** 2, t_b))

    _, (terms, mse) = jax.lax.scan(term, None, jnp.arange(d.num_timesteps - 1, -1, -1))
    # The scan ran t = T-1 .. 0; flip back to [B, T] in timestep order.
    terms, mse = terms[::-1].T, mse[::-1].T
    prior = prior_bpd(d, x_start)
    return BpdResult(jnp.sum(terms, axis=1) + prior, terms, prior, mse)
