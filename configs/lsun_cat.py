"""LSUN Cat (FID 19.75), 1.8M steps: the CelebA-HQ model and optimiser."""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/cat"
    config.data.train_split = "train"
    config.data.random_flip = True
    config.training.num_train_steps = 1_800_000
    return config
