"""Denoising diffusion probabilistic models (Ho, Jain, Abbeel 2020) in JAX/Flax."""

from ddpm import xla_cpu

xla_cpu.set_xla_flags()  # before JAX starts: XLA reads its flags once
