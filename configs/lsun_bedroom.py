"""LSUN Bedroom (FID 6.36), 2.4M steps, no flips: the CelebA-HQ model and optimiser."""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/bedroom"
    config.data.train_split = "train"
    config.data.random_flip = False
    config.training.num_train_steps = 2_400_000
    return config
