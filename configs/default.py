"""Defaults shared by every experiment: the paper's CIFAR-10 setting (Ho et al. 2020, App. B).

Experiment configs import this and override only what differs. Every field can be
changed on the command line: --config.training.batch_size=64.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # One key for everything; folded with step, device and purpose.
    # A checkpoint directory (e.g. written by --mode=convert) whose EMA weights initialise a
    # run when the workdir has no checkpoint of its own. Empty: start from scratch.
    config.init_from = ""
    # Call jax.distributed.initialize() before anything else (multi-host pods and clusters).
    config.distributed = False
    # 'pixel': a diffusion model on images (the sections below). 'text2image': latent
    # text-to-image from converted weights (configs/ldm_text2im.py; --mode=convert/sample).
    config.pipeline = "pixel"

    data = config.data = ml_collections.ConfigDict()
    data.source = "tfds"  # 'tfds' (a tfds dataset by name) or 'folder' (a folder of images).
    data.dataset = "cifar10"  # tfds name, for source 'tfds'.
    data.data_dir = ""  # tfds data_dir; empty: tfds's default (~/tensorflow_datasets).
    # Download and prepare a tfds dataset that data_dir lacks (once, by process 0; in
    # array_record files, which the pipeline reads example by example). False: never
    # download; a dataset that is not prepared is an error.
    data.download = True
    data.path = ""  # The image folder, for source 'folder' (png/jpg, searched recursively).
    data.train_split = "train"
    data.image_size = 32  # Square side in pixels; images are resized and centre-cropped.
    data.num_channels = 3  # 3 for RGB, 1 for grayscale.
    data.random_flip = True  # Random horizontal flips in training.
    # > 0: super-resolution (SR3): the pipeline also yields the image area-downsampled to
    # low_res_size (which must divide image_size), and the U-Net sees it, bicubic-upsampled,
    # next to x_t. --mode=upsample and --mode=eval then work on low-res inputs (see upsample).
    data.low_res_size = 0

    model = config.model = ml_collections.ConfigDict()
    model.ch = 128  # Base channel count.
    model.ch_mult = (1, 2, 2, 2)  # Channel multiplier per resolution level.
    model.num_res_blocks = 2  # Res blocks per level (the up path has one more).
    model.attn_resolutions = (16,)  # Feature-map sizes that get self-attention.
    model.dropout = 0.1
    model.resamp_with_conv = True  # Convolutions in down/upsampling (else pooling / plain).
    # > 0: class-conditional on the dataset's labels (0..num_classes-1; the index num_classes
    # is the "no class" label of classifier-free guidance); 0: unconditional.
    model.num_classes = 0
    model.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); params stay float32.
    # Super-resolution: noise-conditioning augmentation (SR3 / cascaded diffusion). > 0: in
    # training the low-res image is noised to a level s drawn uniformly per example from
    # {0, ..., round(low_res_noise * T)} (0 clean, else q_sample at timestep s - 1), and
    # the U-Net is told s; 0: off.
    model.low_res_noise = 0.0

    diffusion = config.diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"  # See ddpm.schedules.SCHEDULES.
    diffusion.num_timesteps = 1000  # T.
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.mean_type = "eps"  # What the network predicts: eps / xstart / xprev / v.
    # fixedlarge (sigma^2 = beta) / fixedsmall (beta-tilde) / learned / learned_range.
    diffusion.var_type = "fixedlarge"
    diffusion.loss_type = "mse"  # mse (L_simple) / kl (the true bound) / hybrid.
    # > 0: weight L_simple by Min-SNR-gamma (Hang et al. 2023: gamma = 5), which keeps the
    # low-noise steps from dominating training; 0: the paper's unweighted L_simple.
    diffusion.min_snr_gamma = 0.0

    training = config.training = ml_collections.ConfigDict()
    training.batch_size = 128  # Global batch, split evenly over all devices of all hosts.
    training.num_train_steps = 800_000
    training.ema_decay = 0.9999
    # EMA warm-up: update n (from 0) uses decay min(ema_decay, (1 + n) / (10 + n)), so the
    # average forgets the random initial weights within the first steps instead of over
    # ~1 / (1 - ema_decay) of them; for short runs. False: ema_decay from the start (paper).
    training.ema_warmup = False
    # Training steps per call of the compiled step (scanned inside it, as score_sde's
    # n_jitted_steps): fewer dispatches and host round trips. The same updates as single
    # steps; calls end at every log, checkpoint, grid and FID step (single steps lead up to
    # those that are not K steps away), and a preemption stops at the end of a call.
    training.steps_per_dispatch = 1
    training.log_every = 100  # Console line and TensorBoard scalars.
    training.checkpoint_every = 10_000
    training.keep_checkpoints = 3  # The newest K periodic checkpoints are kept.
    # > 0: also keep every checkpoint whose step is a multiple of keep_every (for FID-
    # versus-steps curves); it should be a multiple of checkpoint_every. 0: only the newest.
    training.keep_every = 0
    training.sample_every = 20_000  # A grid of EMA samples to TensorBoard and a PNG.
    training.num_grid_samples = 64  # 0: no sample grids. Conditional: one row per class.
    # Class-conditional models: the probability that an example's label is replaced by the
    # null label, so one network also learns the unconditional model that classifier-free
    # guidance needs (Ho & Salimans 2022 use 0.1-0.2; 0.5 was worse).
    training.label_dropout = 0.1
    # FID during training: every fid_every steps (0: never), FID of fid_num_samples EMA
    # samples drawn by DDIM (eta 0) with fid_num_steps steps, against the eval.split
    # statistics (cached in the workdir), to TensorBoard as 'fid'. A trend, not the
    # paper's 50k-sample FID (eval.num_reference makes the reference smaller as well).
    training.fid_every = 0
    training.fid_num_samples = 1000
    training.fid_num_steps = 50

    optim = config.optim = ml_collections.ConfigDict()
    optim.learning_rate = 2e-4  # Adam, after a linear warm-up from 0.
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0  # Global-norm clipping; 0 disables it.
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8

    sampling = config.sampling = ml_collections.ConfigDict()
    sampling.method = "ddpm"  # 'ddpm' (ancestral) or 'ddim'.
    sampling.num_steps = 0  # Reverse steps; 0: all T. Fewer than T respaces the chain.
    sampling.eta = 0.0  # DDIM noise scale: 0 deterministic, 1 ancestral-like.
    sampling.clip_denoised = True  # Clip predicted x_0 to [-1, 1] at every step.
    sampling.num_samples = 64  # --mode=sample writes this many.
    sampling.batch_size = 256  # Global samples per compiled chain.
    # Classifier-free guidance weight w (Ho & Salimans 2022, eq. 6) for class-conditional
    # models: eps = (1 + w) eps(x_t, y) - w eps(x_t, null). w = 0 is the plain conditional
    # model (no unconditional pass). Libraries that speak of a guidance "scale" s (diffusers,
    # Stable Diffusion: eps_null + s (eps_y - eps_null)) mean s = 1 + w.
    sampling.guidance_scale = 0.0
    # Class of each sample of a conditional model: '' balanced (sample i gets class
    # i mod num_classes), '3,7' those classes repeated in turn, 'null' unconditional.
    sampling.labels = ""

    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.num_samples = 50_000  # FID/IS samples (the paper: 50k against the train set).
    evaluation.split = "train"  # The reference split for FID statistics.
    evaluation.bpd_split = "test"  # The split for bits/dim.
    evaluation.bpd_num_examples = 0  # 0: the whole split.
    evaluation.batch_size = 256
    evaluation.inception_weights = ""  # Path or URL of the FID Inception; empty: default.
    # FID reference images: 0 all of eval.split, else a fixed random subset of this many.
    evaluation.num_reference = 0
    # Class-conditional models: score the samples with a classifier trained once on
    # data.train_split (cached in the workdir): accuracy against the requested labels.
    evaluation.class_accuracy = False

    # --mode=inpaint (ddpm/inpainting.py): fill masked regions of real images. The reverse
    # step is sampling.method's (with sampling.eta and sampling.clip_denoised).
    inpaint = config.inpaint = ml_collections.ConfigDict()
    inpaint.source = ""  # A folder of images; empty: data's split inpaint.split.
    inpaint.split = "test"  # The split of `data` when source is empty (a folder has one).
    # bottom_half / center / lines / strokes, or a folder of mask PNGs (white = known).
    inpaint.mask = "center"
    inpaint.method = "repaint"  # 'repaint' (Lugmayr et al. 2022) or 'replace' (the baseline).
    inpaint.num_steps = 250  # The chain is respaced to this many steps (RePaint: 250).
    inpaint.jump_length = 10  # RePaint's j: steps back up at each jump.
    inpaint.jump_n_sample = 10  # RePaint's r: passes through each stretch (1: no resampling).
    inpaint.num_images = 16  # Images of the source (a fixed random subset if it has more).

    # --mode=upsample (ddpm/upsample_job.py) of a super-resolution config (data.low_res_size).
    upsample = config.upsample = ml_collections.ConfigDict()
    # A folder of low-res images (each low_res_size x low_res_size), or empty: the data's
    # split upsample.split, area-downsampled on the fly (the originals are then known).
    upsample.source = ""
    upsample.split = "test"
    upsample.num_images = 16  # Images of the source (a fixed random subset if it has more).
    upsample.samples_per_image = 1  # Independent samples per low-res image.
    # Noise-conditioned models (model.low_res_noise > 0): the level (a timestep) that the
    # low-res input is noised to and the model is told at sampling. 0: the clean input.
    upsample.low_res_noise_level = 0
    return config
