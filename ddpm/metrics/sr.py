"""Super-resolution metrics on uint8 images: PSNR, SSIM and low-res consistency.

All in float64 numpy, per image, on pixel values in [0, 255] (data range 255), then
averaged over images (as SR3, Saharia et al. 2021, report them):

  PSNR = 10 log10(255^2 / MSE), MSE over all pixels and channels of one image (inf for
    identical images).
  SSIM (Wang et al. 2004, eq. 13) with the standard 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, weighted (not sample) variances, over the 'valid' positions
    only, per channel, then averaged: skimage's structural_similarity(gaussian_weights=
    True, sigma=1.5, use_sample_covariance=False, data_range=255). Images smaller than 11
    use the largest odd window that fits (tiny test images; not comparable to papers).
  Consistency: the MSE, on pixels in [0, 1], between the result area-downsampled
    (unrounded block means) and the low-res input: how faithful the result is to what
    was observed (SR3's "consistency").
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DATA_RANGE = 255.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _as_float_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two image batches [N, H, W, C] of one shape, got "
                         f"{a.shape} and {b.shape}")  # fmt: skip
    return a, b


def psnr(images, references) -> np.ndarray:
    """[N] PSNR in dB of uint8 images [N, H, W, C] against references of the same shape."""
    a, b = _as_float_pair(images, references)
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """[size] normalised 1-D Gaussian taps, centred; the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, H - k + 1, W - k + 1, C]: the separable window, 'valid' region."""
    x = sliding_window_view(x, len(taps), axis=1) @ taps
    return sliding_window_view(x, len(taps), axis=2) @ taps


def ssim(images, references) -> np.ndarray:
    """[N] mean SSIM of uint8 images [N, H, W, C] against references of the same shape."""
    a, b = _as_float_pair(images, references)
    size = min(SSIM_WINDOW, a.shape[1], a.shape[2])
    taps = gaussian_window(size - (size % 2 == 0))  # an odd window has a centre pixel
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return np.mean(numerator / denominator, axis=(1, 2, 3))


def area_mean(images, factor: int) -> np.ndarray:
    """float64 [N, H / factor, W / factor, C]: the mean of each factor x factor block."""
    x = np.asarray(images, np.float64)
    n, height, width, channels = x.shape
    if height % factor or width % factor:
        raise ValueError(f"{height}x{width} images are not divisible into {factor}x{factor} blocks")
    blocks = x.reshape(n, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4))


def consistency(results, low_res) -> np.ndarray:
    """[N] MSE (pixels in [0, 1]) between area-downsampled results [N, H, W, C] and the
    uint8 low-res inputs [N, h, w, C] they were made from (H / h an integer)."""
    factor = results.shape[1] // low_res.shape[1]
    if factor * low_res.shape[1] != results.shape[1]:
        raise ValueError(f"result size {results.shape[1]} is not a multiple of {low_res.shape[1]}")
    error = (area_mean(results, factor) - np.asarray(low_res, np.float64)) / DATA_RANGE
    return np.mean(error**2, axis=(1, 2, 3))


def scores(results, originals, low_res) -> dict:
    """{'psnr', 'ssim', 'consistency'} averaged over the N images (float; psnr may be inf)."""
    values = {
        "psnr": psnr(results, originals),
        "ssim": ssim(results, originals),
        "consistency": consistency(results, low_res),
    }
    return {name: float(np.mean(value)) for name, value in values.items()}
