"""Beta schedules as float64 numpy arrays.

Every schedule of the official DDPM code (linear, quad, const, jsd, warmup10,
warmup50), the cosine schedule of improved DDPM (Nichol & Dhariwal 2021) and the
sigmoid schedule, and diffusers' name 'scaled_linear' for 'quad' (latent diffusion:
linspace(sqrt(0.00085), sqrt(0.012), 1000)^2). Tables are built in float64 here and cast
to float32 only when the diffusion gathers them (REFERENCE.md: "The official math, exactly").
"""

import math

import numpy as np

SCHEDULES = (
    "linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine", "sigmoid", "scaled_linear"
)  # fmt: skip

# Improved DDPM: the offset s keeps beta_0 from being vanishingly small, and the
# cap keeps the last steps from being singular (alpha_bar_T = 0 gives beta = 1).
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def get_beta_schedule(
    name: str, *, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Returns betas [num_timesteps] float64 for the named schedule.

    Args:
      name: one of SCHEDULES.
      num_timesteps: T, the number of diffusion steps (>= 1).
      beta_start, beta_end: the range of betas. Used by linear, quad (scaled_linear),
        warmup*, sigmoid; const uses beta_end; jsd and cosine ignore both.

    Raises:
      ValueError: for an unknown name, T < 1, or betas outside (0, 1].
    """
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name not in ("jsd", "cosine"):
        if not 0.0 < beta_start <= beta_end <= 1.0:
            raise ValueError(
                f"schedule {name!r} needs 0 < beta_start <= beta_end <= 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
    T = num_timesteps
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name in ("quad", "scaled_linear"):
        # The same betas under two names: the official DDPM code's 'quad', and diffusers'
        # 'scaled_linear' of latent diffusion (0.00085 -> 0.012).
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "jsd":  # 1/T, 1/(T-1), ..., 1: the Jensen-Shannon schedule of Sohl-Dickstein.
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name in ("warmup10", "warmup50"):
        warmup_frac = {"warmup10": 0.1, "warmup50": 0.5}[name]
        betas = np.full(T, beta_end, dtype=np.float64)
        warmup_steps = int(T * warmup_frac)
        betas[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
    elif name == "cosine":
        betas = _cosine_betas(T)
    elif name == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
        betas = sig * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return betas


def _cosine_betas(num_timesteps: int) -> np.ndarray:
    """Improved DDPM eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas capped."""

    def alpha_bar(u):
        return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), COSINE_MAX_BETA) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)
