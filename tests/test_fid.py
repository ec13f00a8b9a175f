"""Frechet distance, running statistics and Inception Score against independent oracles."""

import numpy as np
import pytest
import scipy.linalg

from ddpm.metrics import fid


def _random_covariance(rng, dim, num_samples):
    x = rng.normal(size=(num_samples, dim)) @ rng.normal(size=(dim, dim))
    return np.cov(x, rowvar=False)


def _fid_with_scipy_sqrtm(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.real(covmean)  # discard round-off imaginary parts, as TTUR does
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)


@pytest.mark.parametrize("dim", [3, 32, 128])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1 = _random_covariance(rng, dim, 4 * dim)
    sigma2 = _random_covariance(rng, dim, 4 * dim)
    want = _fid_with_scipy_sqrtm(mu1, sigma1, mu2, sigma2)
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_commuting_covariances_closed_form():
    # Diagonal (commuting) covariances, some singular: d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2, size=10)
    b = rng.uniform(0, 2, size=10)
    a[:3] = 0.0
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))  # a common rotation keeps them commuting
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # The rotation leaves ~1e-16 in the null space, which any matrix square root turns
    # into ~1e-8 (sqrt is not Lipschitz at 0): hence the absolute tolerance.
    got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_fid_of_features_against_themselves_is_zero():
    # Fewer samples than dimensions: singular covariance, like 50k samples vs 2048-d is not.
    features = np.random.default_rng(1).normal(size=(40, 64)) * 3 + 1
    mu, sigma = fid.feature_statistics(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)


@pytest.mark.parametrize("n1, n2", [(5, 9), (30, 40)])
def test_frechet_distance_from_features_equals_covariance_route(n1, n2):
    # Few samples (Gram route, n < D) and many (covariance route) against the definition.
    rng = np.random.default_rng(n1)
    f1 = rng.normal(size=(n1, 24)) @ rng.normal(size=(24, 24))
    f2 = rng.normal(size=(n2, 24)) * 2 + 0.5
    want = fid.frechet_distance(*fid.feature_statistics(f1), *fid.feature_statistics(f2))
    got = fid.frechet_distance_from_features(f1, f2)
    # Rank-deficient covariances cost the D x D route ~sqrt(eps) in their null space.
    assert got == pytest.approx(want, rel=1e-8)
    assert abs(fid.frechet_distance_from_features(f1, f1)) < 1e-12 * np.sum(f1**2)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_running_statistics_equal_one_shot():
    rng = np.random.default_rng(2)
    # A large common offset would ruin a naive sum-of-squares accumulation in float32.
    features = (rng.normal(size=(1001, 24)) * 0.5 + 1000.0).astype(np.float32)
    stats = fid.RunningStatistics(24)
    for start, stop in [(0, 1), (1, 100), (100, 100), (100, 613), (613, 1001)]:
        stats.update(features[start:stop])
    mu, sigma = stats.mean_and_covariance()
    x = features.astype(np.float64)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.count == 1001
    mu1, sigma1 = fid.feature_statistics(features)
    np.testing.assert_allclose(mu1, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma1, sigma, rtol=1e-9, atol=1e-12)


def test_statistics_round_trip(tmp_path):
    mu, sigma = fid.feature_statistics(np.random.default_rng(3).normal(size=(20, 5)))
    fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = fid.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


def _inception_score_oracle(logits, splits):
    # Improved-GAN's formula on softmax probabilities, written out directly.
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[i * len(preds) // splits : (i + 1) * len(preds) // splits]
        py = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_inception_score_matches_formula(splits):
    logits = np.random.default_rng(splits).normal(size=(103, 17)) * 3  # 103: uneven splits
    got = fid.inception_score(logits.astype(np.float32), num_splits=splits)
    want = _inception_score_oracle(logits.astype(np.float32).astype(np.float64), splits)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_inception_score_of_confident_uniform_classes_is_class_count():
    num_classes, per_class = 7, 30
    labels = np.tile(np.arange(num_classes), per_class)  # every split sees all classes
    logits = np.full((labels.size, num_classes), -50.0)
    logits[np.arange(labels.size), labels] = 50.0
    mean, std = fid.inception_score(logits, num_splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-9)
    assert std < 1e-9
    # One class only: no diversity, score 1.
    assert fid.inception_score(np.tile(logits[:1], (30, 1)), 3)[0] == pytest.approx(1.0)
