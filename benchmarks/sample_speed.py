"""Speed of the compiled sampler (sampling.make_sampler) against diffusers' DDPMPipeline.

Run from the repository root:

    .venv/bin/python benchmarks/sample_speed.py --config configs/cifar.py --batch 16 64 256

For each --batch it samples with a respaced ancestral chain of --steps steps (the same
compiled reverse step as the full chain, run fewer times), once to compile and once timed,
on random weights, and reports seconds per step, steps/s and the samples/s that the full
T-step ancestral chain gives. The torch peer, in --torch-python (skipped, with a note, if
that lacks torch or diffusers), runs DDPMPipeline with as many steps on a UNet2DModel of
the same architecture (the parameter counts must agree): one untimed chain, one timed,
per batch. --set overrides config fields on both sides, as in train_step.py. The JAX side
imports no TensorFlow (sampling.make_sampler is what --mode=sample draws with, without
the jobs around it), so it runs where only JAX is.
"""

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train_step import (  # noqa: E402
    RESULT,
    add_set_argument,
    arithmetic_rate,
    forward_gflop,
    has_torch,
    jax_gemm_rate,
    load_config,
    run_result,
    torch_gemm_rate,
    torch_peer,
    torch_spec,
)


def timed_chain(run, batch: int, steps: int) -> dict:
    """Runs run() (a whole chain) to compile or warm up, then times one more run."""
    start = time.perf_counter()
    run()
    warm = time.perf_counter()
    run()
    step_s = (time.perf_counter() - warm) / steps
    return dict(batch=batch, compile_s=warm - start, step_s=step_s, steps_per_s=1 / step_s)


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from ddpm import factories, samplers, sampling

    config = load_config(args.config, args.tiny, args.dtype, args.set)
    config.sampling.update(method="ddpm", num_steps=args.steps)
    model, tx = factories.create_model(config), factories.create_optimizer(config.optim)
    state = jax.jit(lambda: factories.create_train_state(config, model, tx, jax.random.key(0)))()
    sampler = sampling.make_sampler(config, model)
    runs = []
    for batch in args.batch:
        keys = samplers.sample_keys(jax.random.key(0), np.arange(batch))
        # The sampler returns host uint8: the chain has finished when it returns.
        chain = lambda keys=keys: sampler(state.ema_params, keys)  # noqa: E731
        runs.append(timed_chain(chain, batch, args.steps))
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    device = f"{jax.devices()[0].device_kind} x{jax.local_device_count()}"
    return dict(device=device, params=params, num_timesteps=config.diffusion.num_timesteps,
                runs=runs, forward_gflop=forward_gflop(config, model),
                **jax_gemm_rate(config.model.dtype))  # fmt: skip


def run_torch(args, spec) -> dict:
    import torch
    from diffusers import DDPMPipeline

    device, unet, scheduler = torch_peer(spec)
    params = sum(p.numel() for p in unet.parameters())
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=scheduler).to(device)
    pipeline.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def chain(batch):
        with torch.autocast(device, torch.bfloat16, enabled=args.dtype == "bfloat16"):
            pipeline(batch_size=batch, num_inference_steps=args.steps, output_type="np")
        sync()

    runs = [timed_chain(lambda b=b: chain(b), b, args.steps) for b in args.batch]
    return dict(device=device, params=params, runs=runs, **torch_gemm_rate(device, args.dtype))


def arithmetic(run: dict, side: dict) -> str:
    """run's GFLOP/s and their fraction of the side's own GEMM rate (arithmetic_rate)."""
    return (f"{run['gflop_per_s']:.0f} GFLOP/s, {run['of_gemm']:.0%} of a "
            f"{side['gemm_size']}-square GEMM's {side['gemm_gflops']:.0f}")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar.py")
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="global batch sizes")
    parser.add_argument("--steps", type=int, default=20, help="steps of the timed chain")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tiny", action="store_true", help="a small model, for smoke runs")
    parser.add_argument("--torch-python", default=".venv-tools/bin/python")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", choices=("torch",), help=argparse.SUPPRESS)
    add_set_argument(parser)
    parser.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.side:
        print(RESULT + json.dumps(run_torch(args, args.spec)))
        return

    torch_python = REPO / args.torch_python
    torch_python = str(torch_python) if torch_python.exists() else args.torch_python
    spec = torch_spec(args) if has_torch(torch_python) else None  # Its errors come first.
    result = run_jax(args)
    T, name = result["num_timesteps"], f"{args.config}{' (tiny)' * args.tiny}, {args.dtype}"
    for run in result["runs"]:
        run["samples_per_s"] = run["batch"] / (run["step_s"] * T)
        images_per_s = run["batch"] * run["steps_per_s"]
        run.update(arithmetic_rate(result["forward_gflop"], images_per_s, result))
        print(f"{name}, batch {run['batch']} on {result['device']}: compile + first chain "
              f"{run['compile_s']:.1f} s; {run['step_s']:.4f} s per step ({run['steps_per_s']:.1f} "
              f"steps/s, {arithmetic(run, result)}); "
              f"{run['samples_per_s']:.4f} samples/s for {T}-step ancestral sampling",
              flush=True)  # fmt: skip
    result["torch"] = None
    if spec:
        spec["expect_params"] = result["params"]
        cmd = [torch_python, __file__, "--side", "torch", "--config", args.config, "--dtype",
               args.dtype, "--steps", str(args.steps), "--spec", json.dumps(spec),
               "--batch", *map(str, args.batch), *["--tiny"] * args.tiny]  # fmt: skip
        result["torch"] = run_result(cmd, "torch")
        for ours, theirs in zip(result["runs"], result["torch"]["runs"], strict=True):
            ours["torch_steps_per_s"] = theirs["steps_per_s"]
            ours["ratio"] = ours["steps_per_s"] / theirs["steps_per_s"]
            images_per_s = theirs["batch"] * theirs["steps_per_s"]  # the same architecture
            theirs.update(arithmetic_rate(result["forward_gflop"], images_per_s, result["torch"]))
            print(f"batch {ours['batch']}: diffusers DDPMPipeline on {result['torch']['device']} "
                  f"{theirs['steps_per_s']:.2f} steps/s "
                  f"({arithmetic(theirs, result['torch'])}; warm-up "
                  f"{theirs['compile_s']:.1f} s); JAX / torch: {ours['ratio']:.2f}")  # fmt: skip
    else:
        print(f"note: {torch_python} cannot import torch and diffusers; torch side skipped")
    if args.json:
        settings = {k: getattr(args, k) for k in ("config", "steps", "dtype", "tiny")}
        pathlib.Path(args.json).write_text(json.dumps({**settings, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
