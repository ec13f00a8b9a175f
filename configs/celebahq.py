"""CelebA-HQ 256x256 (Ho et al. 2020, App. B): 113.7M parameters, 0.5M steps."""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "celeb_a_hq/256"
    config.data.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.training.num_grid_samples = 16
    config.optim.learning_rate = 2e-5
    config.sampling.batch_size = 64
    config.eval.batch_size = 64
    return config
