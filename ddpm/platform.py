"""Where the job runs: joining a cluster of processes, and saying which devices JAX uses."""

import glob
import os

import jax
from absl import logging

# Set together, they describe the cluster explicitly (e.g. several processes on one machine);
# unset, jax.distributed.initialize() detects SLURM, TPU pods, Kubernetes, ...
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(environ=os.environ) -> None:
    """jax.distributed.initialize(), from CLUSTER_VARIABLES when they are set.

    On the CPU (tests, laptops) the processes' collectives go through gloo, JAX's default.
    """
    given = {name: environ[name] for name in CLUSTER_VARIABLES if environ.get(name)}
    if given and len(given) != len(CLUSTER_VARIABLES):
        missing = sorted(set(CLUSTER_VARIABLES) - set(given))
        raise ValueError(f"set all of {CLUSTER_VARIABLES} or none; missing {missing}")
    if given:
        jax.distributed.initialize(
            coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(given["JAX_NUM_PROCESSES"]),
            process_id=int(given["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU that the driver exposes (without asking JAX)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def log_devices() -> None:
    """One line of platform and devices; a warning when a GPU sits unused by JAX."""
    devices = jax.local_devices()
    logging.info(
        "JAX %s, process %d/%d, platform %s, %d local devices (%s), %d in all",
        jax.__version__, jax.process_index(), jax.process_count(), jax.default_backend(),
        len(devices), devices[0].device_kind, jax.device_count(),
    )  # fmt: skip
    if jax.default_backend() == "cpu" and nvidia_gpu_present():
        logging.warning(
            "This machine has an NVIDIA GPU but JAX runs on the CPU: install the CUDA build "
            "of jax (README, 'GPUs and TPUs')."
        )
