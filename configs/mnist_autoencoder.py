"""Stage 1 of latent diffusion on MNIST: a KL autoencoder from 28x28 digits to 14x14x2 latents.

f = 2 (ch_mult of two levels), 2 latent channels: 392 numbers for 784 pixels. L1
reconstruction plus LDM's KL weight 1e-6, so the latents stay close to deterministic
but bounded. Trains from a folder of digit PNGs (tools/mnist_to_folder.py), then stage 2
(configs/mnist_ldm.py) trains on its latents:
  python main.py --config=configs/mnist_autoencoder.py --workdir=runs/mnist_ae \\
    --config.data.path=data/mnist
  python main.py --mode=eval --config=configs/mnist_autoencoder.py --workdir=runs/mnist_ae \\
    --config.data.path=data/mnist        # PSNR, FID and digit accuracy of reconstructions
At the end of training, the latent scale (1 / std of the latents of 1,024 training
images) is written to runs/mnist_ae/latent_scale.json, next to the final checkpoint.
On a 2-core CPU (benchmarks/latent_mnist.sh): about 4 steps/s; after 1,900 steps (10 min)
1,000 reconstructions have PSNR 36.3 dB, FID 8.29 (the 1,000 originals: 6.35) and 99.4%
digit accuracy (originals: 99.5%); scale 0.224.
"""

import ml_collections

from configs import mnist


def autoencoder_section() -> ml_collections.ConfigDict:
    """The network (shared with stage 2's config, which must describe the same one)."""
    a = ml_collections.ConfigDict()
    a.ch = 32
    a.ch_mult = (1, 2)  # f = 2: 28x28 -> 14x14
    a.num_res_blocks = 1
    a.latent_channels = 2
    a.num_groups = 8
    a.loss = "l1"  # reconstruction: 'l1' (LDM) or 'l2', summed over pixels
    a.kl_weight = 1e-6  # LDM's weight of KL(q(z|x) || N(0, I))
    a.scale_examples = 1024  # training images whose latents give the scale
    return a


def get_config():
    config = mnist.get_config()
    config.pipeline = "autoencoder"
    config.data.source = "folder"
    config.data.path = "data/mnist"
    config.autoencoder = autoencoder_section()
    config.training.num_train_steps = 2000
    config.training.steps_per_dispatch = 1
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    config.training.num_grid_samples = 32  # 4 rows of originals, each above its reconstructions
    config.eval.num_samples = 1000
    config.eval.class_accuracy = True
    config.eval.bpd_split = ""
    return config
