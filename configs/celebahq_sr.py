"""Super-resolution of CelebA-HQ faces, 64x64 to 256x256 (SR3-style), for GPUs.

The CelebA-HQ U-Net (configs/celebahq.py, 113.7M parameters) with the bicubic-upsampled
64x64 face concatenated to its input. For a cascade, whose low-res inputs come from
another model rather than from downsampling, turn on noise-conditioning augmentation
(e.g. --config.model.low_res_noise=0.2 and a small upsample.low_res_noise_level). To
train on your own faces: --config.data.source=folder --config.data.path=DIR.
"""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.low_res_size = 64
    config.training.num_grid_samples = 0  # Grids need low-res inputs: use --mode=upsample.
    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.upsample.split = "train"  # celeb_a_hq has a single split.
    config.upsample.num_images = 1000
    return config
