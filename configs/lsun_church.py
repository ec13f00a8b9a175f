"""LSUN Church (FID 7.89), 1.2M steps: the CelebA-HQ model and optimiser."""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/church_outdoor"
    config.data.train_split = "train"
    config.data.random_flip = True
    config.training.num_train_steps = 1_200_000
    return config
