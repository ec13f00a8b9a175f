"""The MNIST model of configs/mnist.py, conditioned on the digit, with classifier-free guidance.

Trains from a folder of digit PNGs whose first-level folder names are the labels
(tools/mnist_to_folder.py writes DIR/0 ... DIR/9), with 10% of the labels dropped to
the null label so that the same network is also the unconditional model:
  python tools/mnist_to_folder.py --images t10k-images-idx3-ubyte.gz \\
    --labels t10k-labels-idx1-ubyte.gz --out_dir data/mnist
  python main.py --config=configs/mnist_cond.py --workdir=runs/mnist_cond
Ten 7s at w = 2:
  python main.py --mode=sample --config=configs/mnist_cond.py --workdir=runs/mnist_cond \\
    --config.sampling.labels=7 --config.sampling.num_samples=10 \\
    --config.sampling.guidance_scale=2
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.data.source = "folder"
    config.data.path = "data/mnist"
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.training.num_grid_samples = 60  # 6 per class, one row per class
    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.sampling.guidance_scale = 0.5
    config.eval.bpd_split = ""  # a folder has no held-out split
    return config
