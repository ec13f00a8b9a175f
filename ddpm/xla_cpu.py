"""How the library sets up XLA:CPU: its own convolutions, a lighter LLVM, and huge pages.

1. Convolutions. jaxlib 0.10.2's XLA:CPU hands every convolution to YNNPACK. Its weight
gradients run at about half the speed of its forward pass, and convolutions without
padding several times slower than padded ones; XLA's own (Eigen) convolutions have
neither problem. With YNNPACK kept for dots and reductions only (measured on a 2-core
AVX-512 CPU, float32):

- CIFAR-10 train step (configs/cifar.py): 1.24 -> 0.99 s at batch 8, 2.49 -> 2.0 s at 16;
- MNIST train step (configs/mnist.py, batch 32): 0.26 -> 0.20-0.25 s;
- CIFAR-10 U-Net forward at batch 16 (sampling): 521 -> 484 ms;
- FID Inception: 24 -> 31 images/s.

2. LLVM at -O1 (--xla_backend_optimization_level=1; XLA's default is 3) for the code XLA
writes itself, its fusions of elementwise work and reductions, compiles faster and runs
as fast. On a 2-core CPU (2026-12-06), alternating in one process: the CIFAR-10 train
step's XLA compile took 13.9, 17.4, 19.4 and 16.1 s against 18.1, 18.4, 18.2 and 18.6 at
-O3 (batch 8), its calls (batch 16, 4 steps) a median 3.40 s per step against 3.46, and
the U-Net's forward pass at batch 16 (sampling) a median 1.068 s against 1.087; the MNIST
step and the FID Inception did not change; -O0 made the train step 1.5x slower. Machines
with a GPU or TPU keep XLA's level: LLVM compiles their kernels too, and that was not
measured.

Importing `ddpm` applies both flags (ddpm/__init__.py), so that main.py, notebooks, tests
and benchmarks all run the same code; a flag that XLA_FLAGS sets already stays as it is.
XLA reads XLA_FLAGS once, when JAX starts its first backend: a process that started JAX
before importing `ddpm` keeps the defaults, with a warning.

3. Huge pages. Every call of a compiled train step mallocs its temporary buffer (711 MB
for the CIFAR-10 step at batch 8), which glibc maps fresh and unmaps again: 184,000 page
faults and 0.4 s of system time per step. With glibc's malloc asking for transparent
huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) the step faults 1,000 times and takes
0.80 s instead of 1.04. glibc reads the setting only when a process starts, so main.py
restarts itself with it (`restart_with_huge_pages`), and the benchmarks give it to
both sides.
"""

import glob
import importlib.metadata
import os
import sys

from absl import logging

CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"  # 1. above
LLVM_LEVEL = "--xla_backend_optimization_level=1"  # 2. above
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # a GLIBC_TUNABLES entry, glibc >= 2.35
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never"
# XLA aborts the process on a flag it does not know, so only the jaxlib releases that
# were measured get the flags; others keep XLA's defaults.
MEASURED_JAXLIB = ("0.10.2",)  # requirements.txt pins it


def _backends_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def set_xla_flags(environ=os.environ) -> list[str]:
    """Adds CONVOLUTIONS and LLVM_LEVEL to environ's XLA_FLAGS; the flags it added.

    Left alone: a flag that XLA_FLAGS already sets (the user's choice), LLVM_LEVEL on a
    machine with a GPU or TPU, both for a jaxlib outside MEASURED_JAXLIB or without
    package metadata, and both in a process whose JAX backends have started.
    """
    flags = environ.get("XLA_FLAGS", "")
    try:
        if not importlib.metadata.version("jaxlib").startswith(MEASURED_JAXLIB):
            return []
    except importlib.metadata.PackageNotFoundError:  # a jaxlib built from source
        return []
    wanted = [CONVOLUTIONS] + [LLVM_LEVEL] * (not accelerator_present())
    wanted = [flag for flag in wanted if flag.split("=")[0] not in flags]
    if wanted and _backends_started():
        logging.warning(
            "JAX started before `ddpm` was imported: XLA keeps its defaults instead of %s "
            "(with YNNPACK's convolutions a CPU trains about 1.25x slower; import ddpm "
            "first, or put the flags in XLA_FLAGS)", " ".join(wanted),
        )  # fmt: skip
        return []
    if wanted:
        environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()
    return wanted


def nvidia_gpu_present() -> bool:
    """Whether the machine has an NVIDIA GPU that the driver exposes (without asking JAX)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def tpu_present() -> bool:
    """Whether the machine exposes TPU chips (without asking JAX)."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def accelerator_present() -> bool:
    """A GPU or TPU, where the step's buffers live on the device, not in host malloc."""
    return nvidia_gpu_present() or tpu_present()


def _glibc_version() -> tuple[int, ...]:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


def _huge_pages_possible() -> bool:
    """The kernel gives transparent huge pages to a process that asks (madvise or always)."""
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_page_environ(environ=os.environ) -> dict | None:
    """environ with HUGE_PAGES added to GLIBC_TUNABLES; None where it is left alone.

    Left alone: machines with a GPU or TPU (`accelerator_present`), a C library
    other than glibc >= 2.35, a kernel without transparent huge pages, and a
    GLIBC_TUNABLES that already sets glibc.malloc.hugetlb (the user's choice; =0 opts out).
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES.split("=")[0] in tunables or accelerator_present():
        return None
    if _glibc_version() < (2, 35) or not _huge_pages_possible():
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}


def restart_with_huge_pages() -> None:
    """Re-executes this process (same pid, interpreter options and arguments) with
    `huge_page_environ`, unless that leaves the environment alone. Call it first thing."""
    environ = huge_page_environ()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
