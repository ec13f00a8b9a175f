"""Frechet distance, feature statistics and Inception Score, in float64 numpy.

FID (Heusel et al. 2017) between Gaussians N(mu1, S1) and N(mu2, S2) fitted to Inception
pool3 features:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed without a general (non-symmetric) matrix square root:
S1 S2 is similar to the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), whose square
roots of eigenvalues are the singular values of S2^(1/2) S1^(1/2). Symmetric
eigendecompositions and an SVD are stable and real and need no scipy.linalg.sqrtm
(which can return complex parts and needs the epsilon hack of the TTUR code for
singular covariances).

Statistics of 50,000 samples accumulate batch by batch in `RunningStatistics`, so the
features never have to sit in memory at once. Covariances use the unbiased 1/(N-1)
normalisation, as np.cov in TTUR / pytorch-fid / TF-GAN.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from ddpm import npz


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD [D, D] matrices, in float64.

    With A = sigma2^(1/2) sigma1^(1/2), A^T A = sigma1^(1/2) sigma2 sigma1^(1/2), so the
    trace is the sum of A's singular values. Taking them by SVD of A, instead of square
    roots of the eigenvalues of A^T A, keeps round-off in null directions at eps * |A|
    rather than sqrt(eps) * |A|: FID of a singular covariance against itself stays ~1e-13,
    not ~1e-6.
    """
    sqrt1 = _symmetric_sqrt(np.asarray(sigma1, np.float64))
    sqrt2 = _symmetric_sqrt(np.asarray(sigma2, np.float64))
    return float(np.sum(np.linalg.svd(sqrt2 @ sqrt1, compute_uv=False)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D] (symmetric PSD).
    Returns:
      The squared Frechet distance (what papers report as FID), a float >= 0 up to
      round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape}, {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} has non-finite entries")
    mean_term = float(np.sum(np.square(mu1 - mu2)))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2))
    return mean_term + trace_term - 2.0 * trace_sqrt_product(sigma1, sigma2)


def frechet_distance_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, D], [N2, D].

    The value of `frechet_distance(*feature_statistics(f1), *feature_statistics(f2))`.
    When both sets have fewer samples than dimensions (quick checks on a few images) it
    works on the small N2 x N1 matrix instead of D x D covariances: with A_i the centred
    features / sqrt(N_i - 1), S_i = A_i^T A_i, tr(S_i) = |A_i|_F^2, and the nonzero
    eigenvalues of S1^(1/2) S2 S1^(1/2) (those of S2 S1) are the squared singular values
    of A2 A1^T, so tr((S1 S2)^(1/2)) is the sum of those singular values.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"expected features [N1, D] and [N2, D], got {f1.shape}, {f2.shape}")
    if max(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    if min(len(f1), len(f2)) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a1 = (f1 - mu1) / np.sqrt(len(f1) - 1)
    a2 = (f2 - mu2) / np.sqrt(len(f2) - 1)
    trace_sqrt = np.sum(np.linalg.svd(a2 @ a1.T, compute_uv=False))
    return float(np.sum(np.square(mu1 - mu2)) + np.sum(a1**2) + np.sum(a2**2) - 2 * trace_sqrt)


class RunningStatistics:
    """Mean and covariance of feature vectors seen batch by batch, in float64.

    Uses the pairwise update of Chan, Golub & LeVeque (1979): each batch contributes its
    own mean and centred co-moment, so no large uncentred sums cancel.

        stats = RunningStatistics(2048)
        for batch in batches:            # each [B, 2048]
            stats.update(batch)
        mu, sigma = stats.mean_and_covariance()
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.comoment = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> RunningStatistics:
        """Adds features [B, dim] (any float dtype, e.g. a device array)."""
        batch = np.asarray(features, np.float64)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {batch.shape}")
        n = batch.shape[0]
        if n == 0:
            return self
        batch_mean = batch.mean(axis=0)
        centred = batch - batch_mean
        total = self.count + n
        delta = batch_mean - self.mean
        self.comoment += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total
        return self

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [dim], sigma [dim, dim]) with the unbiased 1/(N-1) covariance."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        return self.mean.copy(), self.comoment / (self.count - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 of features [N, D]; sigma as np.cov (1/(N-1))."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"expected features [N, D], got {features.shape}")
    return RunningStatistics(features.shape[1]).update(features).mean_and_covariance()


def save_statistics(path: epath.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes an .npz with keys `mu`, `sigma` (the TTUR / pytorch-fid layout)."""
    npz.save(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: epath.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from an .npz with keys `mu` and `sigma`."""
    stats = npz.load(path)
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    As in the Improved-GAN code: the N samples are cut into `num_splits` consecutive
    parts (rows i*N//num_splits to (i+1)*N//num_splits), p(y) is the mean
    prediction within each part, and the result is the mean and (population) standard
    deviation of the per-part scores. `num_splits=1` gives TF-GAN's single score.

    Args:
      logits: [N, K] classifier logits (any float dtype); computed in float64.
    Returns:
      (mean, std) over the splits.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits [N, K], got {logits.shape}")
    n = logits.shape[0]
    if not 1 <= num_splits <= n:
        raise ValueError(f"num_splits must be in [1, {n}] for {n} samples, got {num_splits}")
    log_p = _log_softmax(logits)  # log p(y|x), exact where p underflows to 0
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        log_py = np.log(np.mean(np.exp(part), axis=0))
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))
