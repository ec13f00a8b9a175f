"""Speed of the compiled sampler (sampling.make_sampler) for a config's model.

Run from the repository root:

    .venv/bin/python benchmarks/sample_speed.py --config configs/cifar.py --batch 16 64 256

For each --batch it samples with a respaced ancestral chain of --steps steps (the same
compiled reverse step as the full chain, run fewer times), once to compile and once timed,
on random weights, and reports seconds per step, steps/s and the samples/s that the full
T-step ancestral chain gives. It imports no TensorFlow (sampling.make_sampler is what
--mode=sample draws with, without the jobs around it), so it runs where only JAX is.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_step import load_config  # noqa: E402

from ddpm import factories, samplers, sampling  # noqa: E402


def time_chain(sampler, params, batch: int, steps: int) -> dict:
    """Compiles the chain for `batch` samples, then times one more run of it."""
    keys = samplers.sample_keys(jax.random.key(0), np.arange(batch))
    start = time.perf_counter()
    sampler(params, keys)  # returns host uint8: the chain has finished
    compiled = time.perf_counter()
    sampler(params, keys)
    step_s = (time.perf_counter() - compiled) / steps
    return dict(batch=batch, compile_s=compiled - start, step_s=step_s, steps_per_s=1 / step_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar.py")
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="global batch sizes")
    parser.add_argument("--steps", type=int, default=20, help="steps of the timed chain")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tiny", action="store_true", help="a small model, for smoke runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    config = load_config(args.config, tiny=args.tiny, dtype=args.dtype)
    config.sampling.update(method="ddpm", num_steps=args.steps)

    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    state = jax.jit(lambda: factories.create_train_state(config, model, tx, jax.random.key(0)))()
    sampler = sampling.make_sampler(config, model)
    T = config.diffusion.num_timesteps
    device = f"{jax.devices()[0].device_kind} x{jax.local_device_count()}"
    runs = []
    for batch in args.batch:
        run = time_chain(sampler, state.ema_params, batch, args.steps)
        run["samples_per_s"] = batch / (run["step_s"] * T)
        runs.append(run)
        print(
            f"{args.config}{' (tiny)' * args.tiny}, {args.dtype}, batch {batch} on {device}: "
            f"compile + first chain {run['compile_s']:.1f} s; {run['step_s']:.4f} s per step "
            f"({run['steps_per_s']:.1f} steps/s); {run['samples_per_s']:.4f} samples/s for "
            f"{T}-step ancestral sampling",
            flush=True,
        )
    if args.json:
        settings = {k: getattr(args, k) for k in ("config", "steps", "dtype", "tiny")}
        result = {**settings, "device": device, "num_timesteps": T, "runs": runs}
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
