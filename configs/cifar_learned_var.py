"""Table 2 ablation: the bound L with a learned diagonal variance (6 output channels).

35,749,766 parameters. Improved DDPM's hybrid objective: set diffusion.var_type to
'learned_range' and diffusion.loss_type to 'hybrid'.
"""

from configs import cifar


def get_config():
    config = cifar.get_config()
    config.diffusion.var_type = "learned"
    config.diffusion.loss_type = "kl"
    return config
