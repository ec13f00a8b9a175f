"""The paper's CIFAR-10 model (Table 1: FID 3.17, IS 9.46): exactly the defaults."""

from configs import default


def get_config():
    return default.get_config()
