"""A small model for MNIST that learns recognisable digits on a 2-core CPU in about 30 min.

Digits are resized from 28x28 to 16x16 (antialiased): on a CPU, convolutions at 28x28
cost about five times as much per step (measured: 1.5 s against 0.34 s at batch 32),
and 16x16 digits are still plainly legible. 1.1M parameters. Offline, train from a
folder of PNGs (tools/mnist_to_folder.py writes one from the IDX files):
  --config.data.source=folder --config.data.path=DIR
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 16
    config.data.num_channels = 1
    config.data.random_flip = False  # Digits are not mirror-symmetric.
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0
    config.training.batch_size = 32
    config.training.num_train_steps = 4000
    config.training.ema_decay = 0.999  # A short run: the paper's 0.9999 averages over too long.
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.eval.split = "test"
    config.eval.num_samples = 1000
    return config
