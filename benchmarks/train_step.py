"""Times one DDPM training step in JAX (this library) and in PyTorch (diffusers), side by side.

Run from the repository root with the library's environment:

    .venv/bin/python benchmarks/train_step.py --batch 128 --steps 20 --json runs/bench.json

Each side runs in its own subprocess, so peak memory is per framework: the JAX side in this
interpreter, the torch side in --torch-python (skipped, with a note, if that one lacks torch
or diffusers; torch is imported nowhere else). Both do the same work per step: random t and
noise, q_sample, the eps MSE (L_simple), backward, global-norm clipping, Adam, and an EMA
update of a copy of the params; both get the uint8 batch from the host, as in training.
The first step (JAX: compilation; torch: warm-up) and the second (JAX compiles again if the
step returns the state with another sharding than it got) are timed on their own, then
--steps steps as one window that ends by waiting for the device. The torch UNet2DModel is
built from the same config and must have as many parameters as ours. --tiny shrinks the
model for smoke runs; --set overrides config fields. For a latent diffusion config
(configs/mnist_ldm.py) the JAX side times stage 2's step, each batch encoded by a freshly
initialised autoencoder of the config's shape, and there is no torch peer. The JAX side
takes what training runs from ddpm.factories and ddpm.updates, which import no TensorFlow
(benchmarks/gpu.sh runs where there is none).
"""

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_PARAMS = 35_746_307  # The paper's CIFAR-10 U-Net, as released (google/ddpm-cifar10-32).
sys.path.insert(0, str(REPO))  # `ddpm` and `configs` from this checkout, as main.py has them.
RESULT = "RESULT "  # Prefix of the line on which a side hands its numbers to the parent.
# jax.monitoring's duration events of one compilation, by phase.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla",
}


def load_config(path: str, tiny: bool, dtype: str, overrides=()):
    """The config at `path`, with overrides 'section.field=value' (a Python literal) applied."""
    spec = importlib.util.spec_from_file_location("benchmark_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.dtype = dtype
    if tiny:  # Two levels of 32 channels at 16x16, for smoke runs.
        config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
        config.data.image_size = 16
    for override in overrides:
        key, _, value = override.partition("=")
        section, field = key.split(".")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a plain string
            pass
        config[section][field] = value
    return config


def add_set_argument(parser) -> None:
    """--set, the overrides that load_config applies (args.set); torch_spec reads them too."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="a config override (repeatable), e.g. --set data.image_size=16",
    )  # fmt: skip


def latent_inputs(config, devices):
    """(latent.TrainingInputs, the autoencoder's params on `devices`) for a latent config:
    a freshly initialised autoencoder stands in for stage 1 (the work is the same)."""
    import jax

    from ddpm import factories, latent, updates

    module = factories.create_autoencoder(config)
    params = jax.jit(lambda: factories.init_params(config, module, jax.random.key(2)))()
    table = latent.prompt_table(config) if factories.uses_text(config) else None
    frozen = latent.Frozen(module, params, scale=1.0, step=0)
    shape = factories.latent_shape(config)
    return latent.TrainingInputs(frozen, shape, table), updates.replicated(params, devices)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def system_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def measure(run_steps, wait, steps: int, per_call: int = 1) -> dict:
    """Times run_steps(n) up to wait(): the first call of per_call steps, the second, then
    `steps` steps as one window, with the system CPU time that window took per step (mostly
    the kernel faulting in fresh memory: benchmarks/README.md, "Why a CPU step time moves")."""

    def timed(n):
        start = time.perf_counter()
        run_steps(n)
        wait()
        return time.perf_counter() - start

    compile_s, second_s = timed(per_call), timed(per_call)
    system_start = system_s()
    step_s = timed(steps) / steps
    return dict(
        compile_s=compile_s,
        second_s=second_s,
        step_s=step_s,
        system_s_per_step=(system_s() - system_start) / steps,
        peak_rss_mb=peak_rss_mb(),
    )


@contextlib.contextmanager
def compile_seconds():
    """Yields {'trace', 'lower', 'xla'}: the seconds JAX spends in each phase of compiling
    while the block runs, summed over its compilations; a cached function adds nothing."""
    import jax

    totals = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)

    def listen(event, duration, **_):
        if event in COMPILE_EVENTS:
            totals[COMPILE_EVENTS[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield totals
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def forward_gflop(config, model) -> float:
    """GFLOP of one example's forward pass through `model`: XLA's count of the program's
    arithmetic before its optimisations (convolutions and matmuls: 2 per multiply-add),
    which a peer of the same architecture does as well. Training does 3x: each
    convolution and matmul has two gradients as large as itself."""
    import jax

    from ddpm import factories

    args, kwargs = factories.example_inputs(config, model)
    params = jax.eval_shape(lambda: factories.init_params(config, model, jax.random.key(0)))
    forward = jax.jit(lambda p: model.apply({"params": p}, *args, **kwargs))
    return forward.lower(params).cost_analysis()["flops"] / 1e9


def arithmetic_rate(gflop_per_image: float, images_per_s: float, side: dict) -> dict:
    """{'gflop_per_s', 'of_gemm'}: a side's model arithmetic per second per device, and
    its fraction of the side's own GEMM rate (side: a result with 'gemm_gflops', and
    'devices' if there are several)."""
    gflop_per_s = gflop_per_image * images_per_s / side.get("devices", 1)
    return dict(gflop_per_s=gflop_per_s, of_gemm=gflop_per_s / side["gemm_gflops"])


def gemm_rate(platform: str, product, wait, reps: int = 5) -> dict:
    """{'gemm_size': n, 'gemm_gflops': r}: the best rate r of product(n)(), a product of two
    n x n matrices, in GFLOP/s: the dense arithmetic a side's library gets from this
    machine, its practical peak. A GPU needs larger matrices than a CPU to be kept busy."""
    size = 2048 if platform == "cpu" else 8192
    run = product(size)
    wait(run())
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        wait(run())
        best = min(best, time.perf_counter() - start)
    return dict(gemm_size=size, gemm_gflops=2 * size**3 / best / 1e9)


def jax_gemm_rate(dtype: str) -> dict:
    """gemm_rate of jnp.matmul, jitted, on JAX's default device."""
    import jax

    matmul = jax.jit(jax.numpy.matmul)

    def product(size):
        square = jax.numpy.ones((size, size), dtype)
        return lambda: matmul(square, square)

    return gemm_rate(jax.default_backend(), product, jax.block_until_ready)


def torch_gemm_rate(device: str, dtype: str) -> dict:
    """gemm_rate of torch's `@` on `device` ('cpu' or 'cuda')."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def product(size):
        square = torch.ones(size, size, device=device, dtype=getattr(torch, dtype))
        return lambda: square @ square

    return gemm_rate(device, product, lambda _: sync())


def diffusers_unet_kwargs(config) -> dict:
    """UNet2DModel arguments for config.model (the DDPM layout), checked by ddpm.convert."""
    from ddpm import convert

    m, size = config.model, config.data.image_size
    attn = [size // 2**level in m.attn_resolutions for level in range(len(m.ch_mult))]
    kwargs = dict(
        sample_size=size,
        in_channels=config.data.num_channels,
        out_channels=config.data.num_channels,
        block_out_channels=[m.ch * mult for mult in m.ch_mult],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        layers_per_block=m.num_res_blocks,
        attention_head_dim=None,  # One head spanning all channels.
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        dropout=m.dropout,
    )
    ours = convert.unet_kwargs_from_diffusers_config(kwargs)  # ValueError if not DDPM's.
    assert ours["attn_resolutions"] == tuple(m.attn_resolutions), ours
    return kwargs


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from ddpm import factories, updates

    config = load_config(args.config, args.tiny, args.dtype, args.set)
    devices = jax.local_devices()
    if args.batch % len(devices):
        raise SystemExit(f"--batch {args.batch} is not divisible by {len(devices)} devices")
    model, diffusion = factories.create_model(config), factories.create_diffusion(config)
    tx = factories.create_optimizer(config.optim)
    state = jax.jit(lambda: factories.create_train_state(config, model, tx, jax.random.key(0)))()
    state = updates.replicated(state, devices)  # as train_and_evaluate does: one compile
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    print(f"jax: {params:,} parameters on {len(devices)} x {devices[0].device_kind}")
    k = args.steps_per_dispatch
    inputs, frozen = latent_inputs(config, devices) if config.pipeline == "latent" else (None,) * 2
    p_train_step = updates.make_train_step(config, model, diffusion, tx, devices, steps=k,
                                           latent_inputs=inputs)  # fmt: skip

    size, channels = config.data.image_size, config.data.num_channels
    shape = (len(devices), args.batch // len(devices))
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, size, size, channels), np.uint8)
    batch = {  # Host uint8 batches, as the input pipeline feeds them.
        "image": pixels,
        "label": np.zeros(shape, np.int32),
    }
    if k > 1:
        batch = updates.stack_steps([batch] * k)  # k steps' batches in one call
    rng, metrics = jax.random.key(1), None

    def run_steps(n):
        nonlocal state, metrics
        for _ in range(n // k):
            state, metrics = p_train_step(state, batch, rng, frozen)

    wait = lambda: jax.block_until_ready((state, metrics))  # noqa: E731
    with compile_seconds() as phases:
        timing = measure(run_steps, wait, args.steps, per_call=k)
    stats = devices[0].memory_stats() if devices[0].platform == "gpu" else None
    return dict(
        device=f"{devices[0].platform} x{len(devices)}",
        devices=len(devices),
        params=params,
        **timing,
        compile_phases_s=phases,
        forward_gflop=forward_gflop(config, model),
        **jax_gemm_rate(config.model.dtype),
        peak_gpu_mb=stats["peak_bytes_in_use"] / 2**20 if stats else None,
    )


def torch_peer(spec: dict):
    """The torch side's (device, UNet2DModel, DDPMScheduler) for `spec` (`torch_spec`).

    All CPU threads, seed 0; the UNet must have as many parameters as ours.
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DModel(**spec["unet"]).to(device)
    params = sum(p.numel() for p in unet.parameters())
    print(f"torch: {params:,} parameters on {device}")
    if params != spec["expect_params"]:
        raise SystemExit(f"torch model has {params:,} parameters, ours {spec['expect_params']:,}")
    scheduler = DDPMScheduler(
        num_train_timesteps=spec["num_timesteps"],
        beta_start=spec["beta_start"],
        beta_end=spec["beta_end"],
        beta_schedule="linear",
    )
    return device, unet, scheduler


def run_torch(args, spec) -> dict:
    import torch
    import torch.nn.functional as F

    device, model, scheduler = torch_peer(spec)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if args.torch_compile else model
    weights = list(model.parameters())
    ema = [p.detach().clone() for p in weights]
    opt = torch.optim.Adam(weights, lr=spec["lr"], betas=spec["betas"], eps=spec["eps"])
    size, channels, num_timesteps = spec["image_size"], spec["channels"], spec["num_timesteps"]
    images = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8)

    def step():
        x_start = images.to(device, non_blocking=True).float() / 127.5 - 1.0
        t = torch.randint(0, num_timesteps, (args.batch,), device=device)
        noise = torch.randn_like(x_start)
        x_t = scheduler.add_noise(x_start, noise, t)
        with torch.autocast(device, torch.bfloat16, enabled=args.dtype == "bfloat16"):
            eps = forward(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(weights, spec["grad_clip"])
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, weights, 1.0 - spec["ema_decay"])

    def run_steps(n):
        for _ in range(n):
            step()

    wait = torch.cuda.synchronize if device == "cuda" else lambda: None
    timing = measure(run_steps, wait, args.steps)
    return dict(
        device=device + (" (torch.compile)" if args.torch_compile else ""),
        params=params,
        **timing,
        **torch_gemm_rate(device, args.dtype),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    )


def run_side(python: str, side: str, args, spec=None) -> dict:
    """Runs one side in a fresh interpreter; its other stdout lines are passed through."""
    cmd = [python, __file__, "--side", side, "--config", args.config, "--dtype", args.dtype]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--steps-per-dispatch", str(args.steps_per_dispatch)]
    cmd += ["--tiny"] * args.tiny + ["--torch-compile"] * args.torch_compile
    cmd += [f"--set={override}" for override in args.set]
    cmd += ["--spec", json.dumps(spec)] if spec else []
    return run_result(cmd, side)


def run_result(cmd: list[str], side: str) -> dict:
    """Runs cmd, passing its stdout through but for the RESULT line, whose JSON it returns."""
    from ddpm import xla_cpu  # here: the torch side's interpreter has no absl for ddpm

    # As main.py runs itself: on a machine without GPU or TPU, with huge pages for malloc.
    env = {**(xla_cpu.huge_page_environ() or os.environ), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    for line in lines:
        if not line.startswith(RESULT):
            print(line, flush=True)
    if proc.returncode:
        raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
    return json.loads(next(line for line in lines if line.startswith(RESULT))[len(RESULT) :])


def torch_spec(args) -> dict:
    """What the torch side needs from the config (it cannot import ml_collections or ddpm)."""
    config = load_config(args.config, args.tiny, args.dtype, args.set)
    if config.diffusion.schedule != "linear" or config.diffusion.loss_type != "mse":
        raise SystemExit("the torch peer implements the linear schedule and L_simple only")
    o = config.optim
    return dict(
        unet=diffusers_unet_kwargs(config),
        image_size=config.data.image_size,
        channels=config.data.num_channels,
        num_timesteps=config.diffusion.num_timesteps,
        beta_start=config.diffusion.beta_start,
        beta_end=config.diffusion.beta_end,
        lr=o.learning_rate,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        grad_clip=o.grad_clip,
        ema_decay=config.training.ema_decay,
    )


def has_torch(python: str) -> bool:
    try:
        check = subprocess.run([python, "-c", "import torch, diffusers"], capture_output=True)
    except OSError:  # No such interpreter.
        return False
    return check.returncode == 0


# (heading, result key, alignment and width, number format) of the table's columns.
COLUMNS = [
    ("device", "device", "<24", ""),
    ("params", "params", ">12", ","),
    ("compile s", "compile_s", ">11", ".2f"),
    ("2nd s", "second_s", ">8", ".2f"),
    ("s/step", "step_s", ">9", ".3f"),
    ("sys s/step", "system_s_per_step", ">12", ".3f"),
    ("images/s", "images_per_s", ">10", ".1f"),
    ("GFLOP/s", "gflop_per_s", ">9", ".0f"),
    ("GEMM GFLOP/s", "gemm_gflops", ">14", ".0f"),
    ("of GEMM", "of_gemm", ">9", ".0%"),
    ("peak RSS MB", "peak_rss_mb", ">13", ".0f"),
    ("peak GPU MB", "peak_gpu_mb", ">13", ".0f"),
]


def report(results: dict, args) -> None:
    print(f"\n{args.config}{' (tiny)' * args.tiny}, batch {args.batch}, {args.dtype}, ", end="")
    print(f"{args.steps} timed steps")
    widths = [width for _, _, width, _ in COLUMNS]
    print(f"{'side':<6}" + "".join(f"{head:{width}}" for head, _, width, _ in COLUMNS))
    for side in ("jax", "torch"):
        if (r := results[side]) is not None:
            cells = (format(r[key], f) if r[key] is not None else "-" for _, key, _, f in COLUMNS)
            print(f"{side:<6}" + "".join(f"{c:{w}}" for c, w in zip(cells, widths, strict=True)))
    phases = results["jax"]["compile_phases_s"]
    print(f"JAX compiling: {sum(phases.values()):.1f} s of the first calls (", end="")
    print(", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items()) + ")")
    print(f"GFLOP/s per device: {results['jax']['forward_gflop']:.2f} GFLOP per image forward "
          "(XLA's count), 3x that per trained image; of GEMM: that rate over the side's own "
          f"product of two {results['jax']['gemm_size']}-square {args.dtype} "
          "matrices (GEMM GFLOP/s)")  # fmt: skip
    if results["ratio"] is not None:
        print(f"JAX images/s / torch images/s: {results['ratio']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar.py")
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after two untimed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--steps-per-dispatch",
        type=int,
        default=1,
        help="JAX: steps per call (training.steps_per_dispatch); it must "
        "divide --steps, and the first and second timings are of one call",
    )
    parser.add_argument("--torch-python", default=".venv-tools/bin/python")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--tiny", action="store_true", help="a small model, for smoke runs")
    parser.add_argument("--json", help="also write the results to this file")
    add_set_argument(parser)
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps % args.steps_per_dispatch:
        parser.error("--steps-per-dispatch must divide --steps")

    if args.side:
        result = run_jax(args) if args.side == "jax" else run_torch(args, args.spec)
        result["images_per_s"] = args.batch / result["step_s"]
        print(RESULT + json.dumps(result))
        return

    torch_python = REPO / args.torch_python
    torch_python = str(torch_python) if torch_python.exists() else args.torch_python
    pixel = load_config(args.config, args.tiny, args.dtype, args.set).pipeline == "pixel"
    spec = torch_spec(args) if pixel and has_torch(torch_python) else None  # Errors first.
    results = {"jax": run_side(sys.executable, "jax", args), "torch": None, "ratio": None}
    if args.config == "configs/cifar.py" and not args.tiny:
        assert results["jax"]["params"] == CIFAR10_PARAMS, results["jax"]["params"]
    if spec:
        spec["expect_params"] = results["jax"]["params"]
        results["torch"] = run_side(torch_python, "torch", args, spec)
        results["ratio"] = results["jax"]["images_per_s"] / results["torch"]["images_per_s"]
    elif not pixel:
        print("note: the torch peer is a pixel-space UNet2DModel; torch side skipped")
    else:
        print(f"note: {torch_python} cannot import torch and diffusers; torch side skipped")
    train_gflop = 3 * results["jax"]["forward_gflop"]  # per image; the same architecture
    for r in filter(None, (results["jax"], results["torch"])):
        r.update(arithmetic_rate(train_gflop, r["images_per_s"], r))
    report(results, args)
    if args.json:
        keys = ("config", "set", "batch", "steps", "dtype", "steps_per_dispatch",
                "torch_compile", "tiny")  # fmt: skip
        settings = {k: getattr(args, k) for k in keys}
        pathlib.Path(args.json).write_text(json.dumps({**settings, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
