"""Write the diffusers UNet2DModel fixtures that tests/test_convert.py checks our UNet against.

Run from the repository root with the tools environment (torch + diffusers):

    .venv-tools/bin/python tools/make_unet_fixtures.py

Each fixture is a small random UNet2DModel in the DDPM layout (single-head attention,
[sin, cos] embedding with freq_shift 1, 'SAME'-style downsampling padding, GroupNorm(32),
eps 1e-6) saved as a diffusers checkpoint directory tests/fixtures/unet_<name>/, plus
inputs.npz with a fixed batch (x NHWC float32 in [-1, 1], t, optional y) and the torch
output converted to NHWC.

Every weight is random, the zero-initialised ones included, so that every layer moves the
output. Weights are rounded to float16 values and stored as float16 (half the bytes); the
reference output is computed in float32 from exactly those values, so nothing is lost.
The library and the tests never import torch or diffusers; only this script does.
"""

import json
import pathlib
import shutil

import numpy as np
import torch
from diffusers import UNet2DModel

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
T = 1000

# The DDPM layout: everything that differs from diffusers' defaults.
DDPM_LAYOUT = dict(
    attention_head_dim=None,  # one head spanning all channels
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,  # [sin, cos]
    freq_shift=1,  # divide by half_dim - 1
    downsample_padding=0,  # pad right/bottom only, as TF 'SAME'
    act_fn="silu",
)

# Why these shapes: with GroupNorm(32), a 32-channel layer has one channel per group, so
# the norm after the timestep (and class) embedding is added removes that per-channel
# shift entirely. Only layers with >= 64 channels make the embeddings visible in the
# output, hence the 64 channels of "b_bin". Sizes are kept small (both about 1.4 MB).
FIXTURE_SPECS = {
    # 2 levels of 32 channels, attention at 16 (level 0), RGB 16x16, current names,
    # saved with save_pretrained.
    "a": dict(
        model=dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32),
            layers_per_block=1,
            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        ),
        t=[0, T - 1, 500],
        fmt="safetensors",
    ),
    # 1 level of 64 channels, no down-path res blocks (the middle and 1 up block only),
    # attention at 8, 1 input / 2 output channels, class-conditional (10 classes + the
    # "no class" index 10); a torch .bin (zip pickle) with the legacy attention names that
    # the released google/ddpm-* files use, for the torch-free .bin reader.
    "b_bin": dict(
        model=dict(
            sample_size=8,
            in_channels=1,
            out_channels=2,
            block_out_channels=(64,),
            layers_per_block=0,
            down_block_types=("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",),
            num_class_embeds=11,
        ),
        t=[0, T - 1, 250, 731],
        fmt="bin",
    ),
}

LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def randomise(model: UNet2DModel, generator: torch.Generator) -> None:
    """Random weights scaled to keep activations O(1); rounded to float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):  # GroupNorm scales
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif name.startswith("class_embedding"):
                value = noise
            else:
                value = noise / np.sqrt(p[0].numel())  # fan-in scaling
            p.copy_(value.half().float())


def make_fixture(name: str, spec: dict, seed: int) -> None:
    out_dir = FIXTURES / f"unet_{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    model = UNet2DModel(**DDPM_LAYOUT, **spec["model"]).eval()
    randomise(model, torch.Generator().manual_seed(seed))

    rng = np.random.default_rng(seed)
    size, in_ch = spec["model"]["sample_size"], spec["model"]["in_channels"]
    t = np.asarray(spec["t"], np.int32)
    x = rng.uniform(-1, 1, (len(t), size, size, in_ch)).astype(np.float32)
    arrays = {"x": x, "t": t}
    class_labels = None
    if "num_class_embeds" in spec["model"]:
        no_class = spec["model"]["num_class_embeds"] - 1  # the last index: "no class"
        # Includes the last real class and the "no class" index.
        y = np.asarray([0, no_class - 1, no_class, 3], np.int32)[: len(t)]
        arrays["y"] = y
        class_labels = torch.from_numpy(y).long()

    def run(unet: UNet2DModel) -> np.ndarray:
        with torch.no_grad():
            out = unet(
                torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(), class_labels
            ).sample
        return out.permute(0, 2, 3, 1).numpy().astype(np.float32)

    arrays["out"] = run(model)
    if spec["fmt"] == "safetensors":  # current attention names
        model.half().save_pretrained(out_dir, safe_serialization=True)
    else:  # a torch .bin with the legacy attention names of the released files
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        for new, old in LEGACY.items():
            state = {k.replace(new, old): v for k, v in state.items()}
        model.save_config(out_dir)
        torch.save(state, out_dir / "diffusion_pytorch_model.bin")
    np.savez(out_dir / "inputs.npz", **arrays)

    # Round trip through diffusers' own loader (which maps legacy names itself).
    reloaded = UNet2DModel.from_pretrained(
        out_dir, torch_dtype=torch.float32, use_safetensors=spec["fmt"] == "safetensors"
    ).eval()
    reload_err = (run(reloaded) - arrays["out"]).max()
    assert abs(reload_err) < 1e-6, f"{name}: reloaded model differs by {reload_err}"

    n_params = sum(p.numel() for p in model.parameters())
    size_kb = sum(f.stat().st_size for f in out_dir.iterdir()) / 1024
    print(
        f"unet_{name}: {n_params} params, {size_kb:.0f} KiB, |out| max "
        f"{np.abs(arrays['out']).max():.3f}, config {json.dumps(spec['model'])}"
    )


def main() -> None:
    torch.set_num_threads(1)
    for seed, (name, spec) in enumerate(FIXTURE_SPECS.items()):
        make_fixture(name, spec, seed)


if __name__ == "__main__":
    main()
