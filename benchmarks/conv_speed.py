"""A 3x3 convolution's forward, input gradient and weight gradient: JAX vs. torch, per shape.

Where the train step's time goes on a CPU: run from the repository root,

    .venv/bin/python benchmarks/conv_speed.py [--shapes 32x28x28x32,8x32x32x128]

Each shape is batch x height x width x channels (same channels in and out, 'SAME'
padding, stride 1), float32. The JAX side runs here, jitted, after importing ddpm (which
sets XLA's flags as training has them) and under whatever else XLA_FLAGS says (to A/B
XLA:CPU's options); the torch side (F.conv2d and aten.convolution_backward, NCHW, all
cores) in --torch-python. Each figure is the mean of --reps calls after one untimed call,
in milliseconds; then torch's time / JAX's.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

RESULT = "RESULT "
REPO = pathlib.Path(__file__).resolve().parents[1]


def timed(fn, reps: int, wait=lambda out: out) -> float:
    wait(fn())
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    wait(out)
    return (time.perf_counter() - start) / reps * 1e3


def run_jax(shape, reps) -> dict:
    sys.path.insert(0, str(REPO))
    import jax

    import ddpm  # noqa: F401  (XLA's flags as the library sets them: ddpm/xla_cpu.py)
    from ddpm.models import convolution

    n, h, w, c = shape
    x, g = (jax.random.normal(jax.random.key(i), (n, h, w, c)) for i in (0, 1))
    kernel = 0.05 * jax.random.normal(jax.random.key(2), (3, 3, c, c))

    def conv(x, kernel):
        return convolution.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=convolution.CANONICAL
        )

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g))
    weight_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g))
    wait = jax.block_until_ready
    return {
        "forward": timed(lambda: forward(x, kernel), reps, wait),
        "input grad": timed(lambda: input_grad(x, kernel, g), reps, wait),
        "weight grad": timed(lambda: weight_grad(x, kernel, g), reps, wait),
    }


def run_torch(shape, reps) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    n, h, w, c = shape
    x, g = torch.randn(n, c, h, w), torch.randn(n, c, h, w)
    kernel = 0.05 * torch.randn(c, c, 3, 3)

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            g, x, kernel, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    return {
        "forward": timed(lambda: torch.nn.functional.conv2d(x, kernel, padding=1), reps),
        "input grad": timed(lambda: backward([True, False, False]), reps),
        "weight grad": timed(lambda: backward([False, True, False]), reps),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="32x28x28x32,32x14x14x64,8x32x32x128,8x16x16x256")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--torch-python", default=".venv-tools/bin/python")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    if args.side:
        run = run_jax if args.side == "jax" else run_torch
        print(RESULT + json.dumps([run(shape, args.reps) for shape in shapes]))
        return
    results = {}
    for side, python in (("jax", sys.executable), ("torch", args.torch_python)):
        command = [python, __file__, "--side", side, "--shapes", args.shapes]
        out = subprocess.run(command + ["--reps", str(args.reps)], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
        if out.returncode or not lines:
            raise SystemExit(f"the {side} side failed:\n{out.stderr[-2000:]}")
        results[side] = json.loads(lines[0][len(RESULT) :])
    print(f"3x3 convolutions, float32, ms per call (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    print(f"{'N x H x W x C':<16}{'op':<13}{'jax':>8}{'torch':>8}{'torch/jax':>11}")
    for shape, ours, theirs in zip(shapes, results["jax"], results["torch"], strict=True):
        for op, ms in ours.items():
            name = "x".join(map(str, shape))
            print(f"{name:<16}{op:<13}{ms:8.2f}{theirs[op]:8.2f}{theirs[op] / ms:11.2f}")


if __name__ == "__main__":
    main()
