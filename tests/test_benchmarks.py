"""The benchmark scripts' plumbing that CI can reach: what the torch peer is told, and
what the timing measures."""

import math
import mmap
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import sample_speed  # noqa: E402
from train_step import (  # noqa: E402
    compile_seconds,
    forward_gflop,
    gemm_rate,
    jax_gemm_rate,
    load_config,
    measure,
    torch_spec,
)


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


def multiply_adds(jaxpr) -> int:
    """The multiply-adds of a jaxpr's convolutions and matrix products, counted from their
    definition: a convolution's taps that fall on padding are not multiplied."""
    from jax.extend.core import jaxprs_in_params

    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            dims, taps = eqn.params["dimension_numbers"], 1
            for axis, (lo, _) in enumerate(eqn.params["padding"]):
                n, k = lhs.shape[dims.lhs_spec[2 + axis]], rhs.shape[dims.rhs_spec[2 + axis]]
                stride, o = eqn.params["window_strides"][axis], out.shape[dims.out_spec[2 + axis]]
                taps *= sum(0 <= stride * j + a - lo < n for j in range(o) for a in range(k))
            batch, features = out.shape[dims.out_spec[0]], out.shape[dims.out_spec[1]]
            total += taps * batch * features * rhs.shape[dims.rhs_spec[1]]
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += out.size * math.prod(lhs.shape[d] for d in contracting)
        total += sum(multiply_adds(sub) for sub in jaxprs_in_params(eqn.params))
    return total


def test_forward_gflop_counts_one_example_through_the_model():
    """XLA's count is twice the forward pass's multiply-adds for one image (convolutions
    and matmuls, counted here from their definition), plus the elementwise work, which is
    little: not the gradients, not a batch."""
    import jax

    from ddpm import factories

    config = load_config("configs/cifar.py", tiny=True, dtype="float32")
    model = factories.create_model(config)
    args, kwargs = factories.example_inputs(config, model)
    params = jax.eval_shape(lambda: factories.init_params(config, model, jax.random.key(0)))
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, *args, **kwargs))(params)
    dense = 2 * multiply_adds(jaxpr.jaxpr) / 1e9
    assert args[0].shape[0] == 1 and dense > 0.05
    assert dense <= forward_gflop(config, model) < 1.05 * dense


def test_gemm_rate_is_the_rate_of_one_product():
    """2 n^3 FLOP over the best of the timed products: a product that takes longer gives
    proportionally less."""
    rate = jax_gemm_rate("float32")
    size = rate["gemm_size"]
    assert size == 2048 and 1 < rate["gemm_gflops"] < 1e5
    slow = gemm_rate("cpu", lambda n: lambda: time.sleep(0.05), lambda _: None)
    assert abs(slow["gemm_gflops"] - 2 * size**3 / 0.05 / 1e9) < 0.1 * slow["gemm_gflops"]
