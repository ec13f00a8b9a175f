"""A small model for MNIST that learns recognisable digits on a 2-core CPU.

28x28 grayscale as is (28 -> 14 -> 7 through two downsamplings), about 1.6M
parameters. Offline, train from a folder of PNGs (tools/mnist_to_folder.py writes one):
  --config.data.source=folder --config.data.path=DIR
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False  # Digits are not mirror-symmetric.
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (14,)
    config.model.dropout = 0.0
    config.training.batch_size = 64
    config.training.num_train_steps = 10_000
    config.training.ema_decay = 0.999  # A short run: the paper's 0.9999 averages over too long.
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 2500
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 500
    config.eval.split = "test"
    config.eval.num_samples = 1000
    return config
