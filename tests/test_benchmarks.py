"""The benchmark scripts' plumbing that CI can reach: what the torch peer is told."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import sample_speed  # noqa: E402
from train_step import torch_spec  # noqa: E402


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
