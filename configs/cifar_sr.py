"""Super-resolution of CIFAR-10, 16x16 to 32x32 (SR3-style), for GPUs.

The paper's CIFAR-10 U-Net (configs/cifar.py) with the bicubic-upsampled 16x16 image
concatenated to its input (3 more input channels; nothing else changes). Sampling: DDIM,
100 steps. Evaluate with --mode=eval (PSNR, SSIM, consistency, FID against bicubic) on
upsample.num_images test images, upsample.samples_per_image samples each.
"""

from configs import cifar


def get_config():
    config = cifar.get_config()
    config.data.low_res_size = 16
    config.training.num_grid_samples = 0  # Grids need low-res inputs: use --mode=upsample.
    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.upsample.split = "test"
    config.upsample.num_images = 10_000
    config.upsample.samples_per_image = 1
    return config
