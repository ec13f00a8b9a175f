"""Seconds per image of latent text-to-image (ddpm/text2image.py), from a pipeline folder.

Run from the repository root (the tiny fixture pipeline, or the release with its config):

    .venv/bin/python benchmarks/text2image_speed.py --tiny
    .venv/bin/python benchmarks/text2image_speed.py --source ldm-text2im-large-256 --batch 4

It converts the folder into a temporary workdir, then samples one batch to compile and
one timed batch (DDIM with the config's steps, eta and guidance: the pipeline's
documented 50 steps, eta 0.3, diffusers' scale 6), and reports seconds per image.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import ldm_text2im  # noqa: E402
from ddpm import samplers, text2image  # noqa: E402
from tests.tiny import tiny_text2image_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture pipeline")
    parser.add_argument("--source", default=str(REPO / "tests/fixtures/ldm_tiny"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.3)
    args = parser.parse_args()
    config = tiny_text2image_config() if args.tiny else ldm_text2im.get_config()
    config.sampling.update(num_steps=args.steps, eta=args.eta)

    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        text2image.convert(config, args.source, workdir)
        models, params, tokenizer, _ = text2image.load(config, workdir)
        convert_s = time.perf_counter() - start
        sampler = text2image.make_sampler(config, models, tokenizer)
        ids = tokenizer([config.sampling.prompt] * args.batch)
        seconds = []
        for batch in range(2):
            keys = samplers.sample_keys(jax.random.key(batch), np.arange(args.batch))
            start = time.perf_counter()
            jax.block_until_ready(sampler(params, keys, ids))
            seconds.append(time.perf_counter() - start)
    c = config.sampling
    print(
        f"{'tiny fixture' if args.tiny else args.source}: DDIM {c.num_steps} steps, eta {c.eta},"
        f" w {c.guidance_scale} (diffusers' scale {c.guidance_scale + 1}), batch {args.batch},"
        f" {config.data.image_size}x{config.data.image_size}, {jax.device_count()} device(s)\n"
        f"convert + load {convert_s:.1f} s; first batch (with compile) {seconds[0]:.1f} s;"
        f" timed batch {seconds[1]:.2f} s = {seconds[1] / args.batch:.3f} s/image"
    )


if __name__ == "__main__":
    main()
