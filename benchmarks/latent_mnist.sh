#!/bin/bash
# Latent diffusion end to end on the real digits, against the pixel-space model (issue 17):
# stage 1 (configs/mnist_autoencoder.py, 1,900 steps), its eval; stage 2 conditioned on
# labels and on prompts (configs/mnist_ldm.py, 3,500 steps each), their evals (FID and
# digit accuracy of 1,000 guided samples, DDIM-40 eta 1, w = 0.5); then the pixel-space
# conditional model (configs/mnist_cond.py) for about the same wall clock (4,800 steps),
# evaluated with the same sampler. Wall-clock marks go to OUT/times.txt, logs to OUT/*.log.
#
#   benchmarks/latent_mnist.sh DIGITS OUT [STATS]
# DIGITS: tools/mnist_to_folder.py's folder of the 10,000 test digits. STATS: a folder of
# cached FID statistics (fid_stats/<name>.npz, as a workdir keeps them), copied into each
# workdir so the 10,000 digits' Inception pass runs once (it takes about 37 min here).
set -euo pipefail
cd "$(dirname "$0")/.."
DIGITS=$1 OUT=$2 STATS=${3:-}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
mark() { echo "TIME $1 $(date +%s)" >> "$OUT/times.txt"; }
prepare() {  # a workdir with the cached statistics and the first run's digit classifier
  mkdir -p "$1"
  if [ -n "$STATS" ]; then cp -r "$STATS/fid_stats" "$1/"; fi
  if [ -d "$OUT/ae/classifier" ]; then cp -r "$OUT/ae/classifier" "$1/"; fi
}
run() {  # name, then main.py's arguments
  local name=$1; shift
  mark "${name}_start"
  "$PY" main.py "$@" --config.data.path="$DIGITS" > "$OUT/$name.log" 2>&1
  mark "${name}_end"
}
prepare "$OUT/ae"
run ae --config=configs/mnist_autoencoder.py --workdir="$OUT/ae" --config.training.num_train_steps=1900
run ae_eval --mode=eval --config=configs/mnist_autoencoder.py --workdir="$OUT/ae"
for condition in label text; do
  W="$OUT/ldm_$condition"
  prepare "$W"
  run "ldm_$condition" --config=configs/mnist_ldm.py --workdir="$W" \
    --config.latent.autoencoder="$OUT/ae" --config.latent.condition=$condition \
    --config.training.num_train_steps=3500
  run "ldm_${condition}_eval" --mode=eval --config=configs/mnist_ldm.py --workdir="$W" \
    --config.latent.condition=$condition
done
prepare "$OUT/pixel_cond"
run pixel_cond --config=configs/mnist_cond.py --workdir="$OUT/pixel_cond" \
  --config.training.num_train_steps=4800 --config.sampling.num_steps=40
run pixel_cond_eval --mode=eval --config=configs/mnist_cond.py --workdir="$OUT/pixel_cond" \
  --config.sampling.num_steps=40 --config.eval.class_accuracy=True
grep -h "Autoencoder at step\|Evaluation at step" "$OUT"/*_eval.log
