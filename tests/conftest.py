"""Shared test set-up: eight fake CPU devices, so data-parallel code runs as on a pod."""

import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test session. The suite's programs are
# tiny and compiling them is most of its time: LLVM at -O0 compiles XLA:CPU's code in half
# the time for a model's init and three quarters for a train step (same HLO, so the same
# math; bitwise comparisons are between programs compiled alike). Runtime-bound tests ask
# for -O3 for their own program (tiny.OPTIMIZED).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache for every process of the session (both xdist workers, and the
# main.py processes that tests start; all inherit the environment): a program that several
# tests build from different Python functions compiles once. It is new for each session and
# removed at its end: jaxlib 0.10.2's CPU executables loaded from a cache that an earlier
# session wrote crash the process now and then (a segfault in deserialize_executable; 3 of
# 3 warm runs crashed), and CI, from a fresh clone, never had one to reuse.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-tests-jax-cache-")
    SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # this process made it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The longest tests (main.py launches, notebooks, a 20k-step toy run) go first: under
# `pytest -n 2` they start early and the short tests fill in around them, instead of one of
# them running last on a worker of its own while the other worker idles.
LONG_FIRST = ("test_multiprocess.py", "test_resume.py", "test_notebooks.py", "test_toy_2d.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: else as collected


def pytest_sessionfinish(session):
    if "SESSION_CACHE" in globals():  # the process that made the cache: pytest, not a worker
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)
