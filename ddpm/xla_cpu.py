"""The one XLA flag the library sets: XLA:CPU's own convolutions instead of YNNPACK's.

jaxlib 0.10.2's XLA:CPU hands every convolution to YNNPACK. Its weight gradients run at
about half the speed of its forward pass, and convolutions without padding several times
slower than padded ones; XLA's own (Eigen) convolutions have neither problem. With
YNNPACK kept for dots and reductions only (measured on a 2-core AVX-512 CPU, float32):

- CIFAR-10 train step (configs/cifar.py): 1.24 -> 0.99 s at batch 8, 2.49 -> 2.0 s at 16;
- MNIST train step (configs/mnist.py, batch 32): 0.26 -> 0.20-0.25 s;
- CIFAR-10 U-Net forward at batch 16 (sampling): 521 -> 484 ms;
- FID Inception: 24 -> 31 images/s.

Importing `ddpm` applies it (ddpm/__init__.py), so that main.py, notebooks, tests and
benchmarks all run the same code. XLA reads XLA_FLAGS once, when JAX starts its first
backend: a process that started JAX before importing `ddpm` keeps the default, with a
warning.
"""

import importlib.metadata
import os
import sys

from absl import logging

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# XLA aborts the process on a flag it does not know, so only the jaxlib releases that
# were measured get it; others keep XLA's defaults.
MEASURED_JAXLIB = ("0.10.2",)  # requirements.txt pins it


def _backends_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def prefer_xla_convolutions(environ=os.environ) -> bool:
    """Adds FLAG to environ's XLA_FLAGS; whether it did.

    Left alone: XLA_FLAGS that already choose YNNPACK's fusion types (the user's choice),
    a jaxlib outside MEASURED_JAXLIB or without package metadata, and a process whose JAX
    backends have started.
    """
    flags = environ.get("XLA_FLAGS", "")
    if FLAG.split("=")[0] in flags:
        return False
    try:
        if not importlib.metadata.version("jaxlib").startswith(MEASURED_JAXLIB):
            return False
    except importlib.metadata.PackageNotFoundError:  # a jaxlib built from source
        return False
    if _backends_started():
        logging.warning(
            "JAX started before `ddpm` was imported: XLA:CPU keeps YNNPACK's convolutions, "
            "about 1.25x slower to train on a CPU (import ddpm first, or set XLA_FLAGS=%s)",
            FLAG,
        )
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
