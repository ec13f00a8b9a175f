"""Speed of the compiled sampler (evaluation.make_sampler) for a config's model.

Run from the repository root:

    .venv/bin/python benchmarks/sample_speed.py --config configs/cifar.py --batch 4 --steps 20

It samples with a respaced chain of --steps steps (the same compiled reverse step as the
full chain, run fewer times), once to compile and once timed, on random weights, and
reports seconds per step and the samples/s that the full T-step ancestral chain gives.
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_step import load_config  # noqa: E402

from ddpm import evaluation, factories  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    config = load_config(args.config, tiny=False, dtype=args.dtype)
    config.sampling.update(method="ddpm", num_steps=args.steps)

    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    state = jax.jit(lambda: factories.create_train_state(config, model, tx, jax.random.key(0)))()
    sampler = evaluation.make_sampler(config, model)
    keys = evaluation.sample_keys(jax.random.key(0), np.arange(args.batch))
    start = time.perf_counter()
    sampler(state.ema_params, keys)
    compiled = time.perf_counter()
    sampler(state.ema_params, keys)
    per_step = (time.perf_counter() - compiled) / args.steps
    T = config.diffusion.num_timesteps
    print(
        f"{args.config}, batch {args.batch} on {jax.device_count()} x {jax.devices()[0].platform}: "
        f"compile + first chain {compiled - start:.1f} s; {per_step:.3f} s per step; "
        f"{args.batch / (per_step * T):.4f} samples/s for {T}-step ancestral sampling"
    )


if __name__ == "__main__":
    main()
