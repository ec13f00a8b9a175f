"""Where the job runs: joining a cluster of processes, saying which devices JAX uses, and
the host's malloc settings for training on a CPU in a process that cannot restart."""

import ctypes
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ddpm.xla_cpu import accelerator_present, nvidia_gpu_present

# Set together, they describe the cluster explicitly (e.g. several processes on one machine);
# unset, jax.distributed.initialize() detects SLURM, TPU pods, Kubernetes, ...
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# mallopt parameters (glibc's malloc.h), and the largest int it takes: 2 GiB of free heap.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER_TRIM = 2**31 - 1


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
    _connect_collectives()


def wait_for_all_processes(name: str, timeout_s: int | None = None) -> None:
    """Blocks until every process arrives here (no-op in a single process).

    A barrier of the coordination service (orbax's default timeout, 5 minutes, unless
    `timeout_s`), not a device collective. Each name is used once per run.
    """
    if jax.process_count() > 1:
        processes = set(range(jax.process_count()))
        ocp.multihost.sync_global_processes(name, timeout=timeout_s, processes=processes)


def _connect_collectives() -> None:
    """Makes the device collectives' connections while the processes are together.

    On the CPU (gloo) the first collective over a set of devices connects them, and fails
    when the processes arrive more than 30 s apart, as they can after start-ups of
    different lengths (restoring, compiling). Once made, the connections wait as long as
    needed. This connects the two sets the job uses: all devices (the pmapped step,
    orbax's collectives) and one device per process (process_allgather).
    """
    wait_for_all_processes("connect collectives")
    ones = np.ones(jax.local_device_count(), np.int32)
    total = jax.pmap(lambda x: jax.lax.psum(x, "all"), axis_name="all")(ones)
    processes = multihost_utils.process_allgather(np.int32(1))
    if int(total[0]) != jax.device_count() or int(processes.sum()) != jax.process_count():
        raise RuntimeError("The processes' devices do not add up: check the cluster set-up.")


def keep_freed_memory(environ=os.environ) -> bool:
    """On a machine without GPU or TPU: one malloc arena that never unmaps or trims.

    Whether it set them. For a process that cannot restart itself with huge pages as
    main.py does (`xla_cpu.restart_with_huge_pages`), such as a notebook's. Measured on a
    2-core CPU (configs/mnist.py, batch 32, 4 steps per call): the compiled train step
    takes 0.27 s alone but 0.37-0.41 s in a process where the tf.data pipeline has run,
    with four times the system time and 9.4 million page faults instead of 1.7 million:
    with the pipeline's threads about, XLA's step buffers come from malloc arenas that
    give their memory back to the kernel after every step, and every step faults it in
    again. These settings bring it back to 0.27 s (peak RSS 2.7 GB instead of 2.1). Call
    it before TensorFlow starts its threads. (In main.py, huge pages alone trained the
    CIFAR-10 model at 0.92 steps/s against 0.73-0.82 with these settings, batch 8.)

    Left alone: accelerators (the host only feeds data there, and one arena would make
    the input threads queue for its lock), a C library without mallopt (not glibc), and
    a user's own MALLOC_* settings.
    """
    if accelerator_present():
        return False
    if any(name.startswith("MALLOC_") for name in environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


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
