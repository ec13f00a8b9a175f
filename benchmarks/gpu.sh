#!/usr/bin/env bash
# The GPU benchmark in one table, in about 8 minutes on one H100 or H200: JAX train steps/s
# of the paper's CIFAR-10 model at batch 128 in float32 and in bfloat16 compute (params
# float32), JAX sampler steps/s (the DDPM ancestral step in one compiled loop) at batch 256,
# and the PyTorch peer's train steps/s (eager float32, eager bf16 autocast, torch.compile).
#
#   bash benchmarks/gpu.sh [--tiny] [WHEELS_DIR]
#
# It runs train_step.py (both sides, --json) and sample_speed.py, then prints the table
# from their JSON files, which stay in runs/gpu/. The JAX side imports no TensorFlow, so
# the machine needs Python 3.12 with jax (CUDA), flax, optax, orbax-checkpoint and torch.
# What the benchmarks need besides (ml_collections for the configs, diffusers for the torch
# peer): if python3 cannot import them, they are installed from the wheels in WHEELS_DIR
# (default benchmarks/wheels, relative to the repository root; no network) into a
# throwaway venv that sees python3's packages. Fill that folder on a connected machine:
#
#   pip download --dest benchmarks/wheels --only-binary=:all: --python-version 3.12 \
#       --implementation cp --abi cp312 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       ml-collections diffusers
#
# (--python-version and --platform need --only-binary=:all:, as pip cannot build sdists
# for another interpreter; the second platform admits wheels built for glibc 2.28 only.)
# torch.compile runs under a timeout and is reported as skipped if it does not finish.
#
# --tiny: train_step.py's small model, small batches and few steps, so that the whole
# script finishes in a few minutes on a CPU (how it is tested without a GPU). In a
# development checkout the JAX side runs in .venv and the torch side in .venv-tools.
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=()
if [[ ${1:-} == --tiny ]]; then
  tiny=(--tiny)
  shift
fi
wheels=${1:-benchmarks/wheels}
if ((${#tiny[@]})); then
  batch=4 steps=4 per_dispatch=2 sample_batch=4 sample_steps=4 compile_timeout=120
else
  # 100 timed steps, 10 per compiled call (training.steps_per_dispatch): few dispatches.
  batch=128 steps=100 per_dispatch=10 sample_batch=256 sample_steps=100 compile_timeout=200
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
results=runs/gpu
mkdir -p "$results"
rm -f "$results"/*.json

if [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
  if ! python3 -c "import ml_collections, diffusers" 2>/dev/null; then
    if [[ ! -d $wheels ]]; then
      echo "python3 lacks ml_collections or diffusers, and there is no $wheels to install" \
        "them from: see the pip download command at the top of $0" >&2
      exit 1
    fi
    python3 -m venv --system-site-packages "$tmp/venv"
    "$tmp/venv/bin/python" -m pip install -q --no-index --find-links "$wheels" \
      ml-collections diffusers
    py=$tmp/venv/bin/python
  fi
fi
torch_py=$py
if [[ -x .venv-tools/bin/python ]]; then
  torch_py=.venv-tools/bin/python
fi
echo "JAX side: $py; torch side: $torch_py"
# The torch.compile run repeats the float32 JAX side (train_step.py runs both); from this
# cache it does not compile again.
export JAX_COMPILATION_CACHE_DIR=$tmp/jax_cache

# train_step.py at this script's settings; each run adds --dtype, --json and any flags.
train=("$py" benchmarks/train_step.py "${tiny[@]}" --batch "$batch" --steps "$steps"
  --steps-per-dispatch "$per_dispatch" --torch-python "$torch_py")
"${train[@]}" --dtype float32 --json "$results/train_float32.json"
"${train[@]}" --dtype bfloat16 --json "$results/train_bfloat16.json"
"$py" benchmarks/sample_speed.py "${tiny[@]}" --batch "$sample_batch" --steps "$sample_steps" \
  --torch-python "$torch_py" --json "$results/sample.json"
# timeout stops the whole process group: train_step.py and the torch side it started.
rc=0
timeout "$compile_timeout" "${train[@]}" --dtype float32 --torch-compile \
  --json "$results/train_compile.json" || rc=$?
no_compile="failed (exit $rc), see above"
if ((rc == 124)); then no_compile="not done within $compile_timeout s, stopped"; fi

"$py" - "$results" "$no_compile" <<'EOF'
import json
import pathlib
import sys

results, why_no_compile = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
f32, bf16, sample = runs["train_float32"], runs["train_bfloat16"], runs["sample"]
compiled = runs.get("train_compile")
no_torch = "no torch or diffusers"
# (side, dtype, the run, its result for that side, why there may be none)
train_rows = [
    ("jax", "float32", f32, f32["jax"], None),
    ("jax", "bfloat16", bf16, bf16["jax"], None),
    ("torch eager", "float32", f32, f32["torch"], no_torch),
    ("torch eager", "bf16 autocast", bf16, bf16["torch"], no_torch),
    ("torch.compile", "float32", compiled, compiled and compiled["torch"],
     no_torch if compiled else why_no_compile),
]  # fmt: skip

print(f"\n{f32['config']}{' (tiny)' * f32['tiny']} on {sample['device']}")
line = "{:<14}{:<7}{:<15}{:>6}{:>12}{:>12}{:>10}{:>10}{:>18}"
head = ("side", "work", "dtype", "batch", "steps/call", "1st call s", "steps/s", "images/s",
        "GFLOP/s (of GEMM)")  # fmt: skip


def arithmetic(r):
    return f"{r['gflop_per_s']:.0f} ({r['of_gemm']:.0%})"


print(line.format(*head))
for side, dtype, run, r, why in train_rows:
    if r is None:
        print(line.format(side, "train", dtype, *"------") + f"  ({why})")
        continue
    per_call = run["steps_per_dispatch"] if side == "jax" else 1
    cells = (run["batch"], per_call, f"{r['compile_s']:.1f}", f"{1 / r['step_s']:.2f}")
    images = f"{r['images_per_s']:.1f}"
    print(line.format(side, "train", dtype, *cells, images, arithmetic(r)))
sample_rows = [("jax", sample["runs"])]
sample_rows += [("torch eager", sample["torch"]["runs"])] if sample["torch"] else []
for side, sample_runs in sample_rows:
    for r in sample_runs:
        cells = (r["batch"], sample["steps"], f"{r['compile_s']:.1f}", f"{r['steps_per_s']:.2f}")
        print(line.format(side, "sample", sample["dtype"], *cells, "-", arithmetic(r)))
if not sample["torch"]:
    print(line.format("torch eager", "sample", sample["dtype"], *"------") + f"  ({no_torch})")
print(
    f"train: {f32['steps']} steps timed after two calls; 1st call s: JAX compile and its "
    "steps, torch warm-up (or compile)\nsample: the DDPM ancestral step in one compiled loop "
    "(torch: DDPMPipeline); 1st call s: compile (torch: warm-up) and a chain; JAX's full "
    f"{sample['num_timesteps']}-step chain gives "
    + ", ".join(f"{r['samples_per_s']:.2f} samples/s at batch {r['batch']}" for r in sample["runs"])
    + f"\nGFLOP/s: {sample['forward_gflop']:.2f} GFLOP per image forward (XLA's count), 3x per "
    "trained image; of GEMM: of the side's own rate on a product of two square matrices"
)
print(f"JSON files: {results}/")
EOF
