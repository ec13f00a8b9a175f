"""The benchmark scripts' plumbing that CI can reach: what the torch peer is told, and
what the timing measures."""

import mmap
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import sample_speed  # noqa: E402
from train_step import compile_seconds, measure, torch_spec  # noqa: E402


def test_sample_speed_gives_the_torch_peer_the_overridden_config():
    """--set reaches the torch side's spec (sample_speed.py once crashed here, but only
    where torch is installed, so CI never saw it)."""
    args = sample_speed.parse_args(
        ["--tiny", "--set", "data.image_size=8", "--set", "model.dropout=0.0"]
    )
    spec = torch_spec(args)
    assert spec["image_size"] == 8
    assert spec["unet"]["sample_size"] == 8 and spec["unet"]["dropout"] == 0.0
    assert spec["unet"]["block_out_channels"] == [32, 64]  # --tiny's model


def test_measure_counts_the_kernel_time_of_fresh_memory():
    """measure's system time per step: 64 MiB of fresh pages per step cost the kernel their
    zeroing and their faults (16,384 of 4 KiB); arithmetic on mapped memory costs it nothing."""

    def fresh(n):
        for _ in range(n):
            with mmap.mmap(-1, 64 << 20) as block:
                pages = np.frombuffer(block, np.uint8)
                pages[:: mmap.PAGESIZE] = 1
                del pages  # the mapping cannot close while a view of it exists

    warm = np.ones(8 << 20)  # 64 MiB, faulted in here

    def compute(n):
        for _ in range(n):
            warm.sum()

    faulting = measure(fresh, lambda: None, steps=4)
    computing = measure(compute, lambda: None, steps=4)
    print(faulting["system_s_per_step"], computing["system_s_per_step"])
    assert faulting["system_s_per_step"] > 2e-3
    assert computing["system_s_per_step"] < faulting["system_s_per_step"] / 4
    assert set(faulting) >= {"compile_s", "second_s", "step_s", "peak_rss_mb"}


def test_compile_seconds_times_each_compilation_once():
    """A fresh jitted function adds its tracing, lowering and XLA time; calling it again
    (cached) adds nothing, and no time is counted after the block."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x) @ x.T)
    with compile_seconds() as first:
        f(jnp.ones((64, 64))).block_until_ready()
    with compile_seconds() as again:
        f(jnp.ones((64, 64))).block_until_ready()
    jax.jit(lambda x: x + 1)(1.0)  # outside both blocks
    assert set(first) == {"trace", "lower", "xla"}
    assert all(seconds > 0 for seconds in first.values()), first
    assert sum(again.values()) == 0 and sum(first.values()) < 60, (first, again)
