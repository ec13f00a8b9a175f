"""Super-resolution of MNIST digits, 8x8 to 16x16 (area downsampling), for a 2-core CPU.

configs/mnist.py's U-Net (1.1M parameters) with the bicubic-upsampled 8x8 digit as a
second input channel. Trained ~30 min on a CPU from a folder of digits
(tools/mnist_to_folder.py): --config.data.source=folder --config.data.path=DIR.
Sampling: DDIM, 50 steps (eta 0); --mode=eval upsamples upsample.num_images digits of
the data, upsample.samples_per_image times each, and scores them against the originals.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    # 8x8 to 16x16, the setting its figures were measured at (mnist.py is now 28x28).
    config.data.image_size = 16
    config.model.attn_resolutions = (8,)
    config.data.low_res_size = 8
    config.training.num_train_steps = 6000  # More than 30 CPU minutes; SIGTERM saves.
    config.training.num_grid_samples = 0  # Grids need low-res inputs: use --mode=upsample.
    config.sampling.method = "ddim"
    config.sampling.num_steps = 50
    config.upsample.split = "train"  # A folder has one split; tfds mnist: use "test".
    config.upsample.num_images = 500
    config.upsample.samples_per_image = 4
    return config
