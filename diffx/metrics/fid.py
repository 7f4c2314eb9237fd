"""Distances between two sets of image features: FID's Frechet distance and KID.

Both compare features ``(N, D)`` of generated images with those of real ones. FID fits a Gaussian to
each set, and is biased upward at small N (its expectation falls as N grows, so FIDs at different N
are not comparable); KID is an unbiased estimate of a squared MMD, so it is reported beside FID with
the sample counts.
"""

from __future__ import annotations

import numpy as np


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982;
    FID, Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``.

    The trace of the matrix square root is taken from the eigenvalues of the symmetric PSD matrix
    ``S1^1/2 S2 S1^1/2`` (same trace as ``sqrtm(S1 S2)``), so no complex round-off as in scipy's
    ``sqrtm`` and no scipy; covariances of fewer than D samples (singular) are fine."""
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # S1^1/2, (D, D)
    middle = root1 @ sigma2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance(*gaussian(a), *gaussian(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x.y / D + 1)^3`` (Binkowski et al. 2018, sec. 3): (N, D), (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, eq. 3) under the polynomial kernel:
    ``1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)``."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 averaged over ``subsets``
    random subsets of ``min(subset_size, len(x), len(y))`` from each set, as their reference code does
    (it bounds the O(N^2) kernel cost); returns the mean and the standard deviation over subsets."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
