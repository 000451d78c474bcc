"""The metrics, as pure functions of features (NumPy float64 statistics, torch for distances).

    mu, sigma = gaussian_stats(pool)                      # (2048,), (2048, 2048) float64
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    fid = frechet_distance_to_features(pool, ref_mu, ref_sigma)  # the same, faster when N < D
    is_mean, is_std = inception_score(logits, splits=10)
    precision, recall = precision_recall(ref_pool, pool, k=3)
    kid_mean, kid_std = kernel_inception_distance(pool, ref_pool)
    agree = nearest_label_agreement(pixels, labels, ref_pixels, ref_labels)  # class fidelity

Definitions follow the OpenAI ADM evaluator (guided-diffusion `evaluations/evaluator.py`) and
torch-fidelity 0.4.0 (reference/evaluation.md sections 1-2); the code is written fresh.
Differences on purpose: the matrix square root uses symmetric eigendecompositions instead of
`scipy.linalg.sqrtm` (same value to ~1e-6 relative, always real, no SciPy), IS splits come
after a seeded shuffle (ADM uses file order, which makes class-sorted sets score low), and
precision/recall distances are float32 instead of ADM's float16.
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1, as `np.cov`) in float64, `chunk` rows at a time so
    that 50k x 2048 float32 features never get a full float64 copy."""
    features = np.asarray(features)
    n = features.shape[0]
    if features.ndim != 2 or n < 2:
        raise ValueError(f"need a (N, D) feature matrix with N >= 2, got shape {features.shape}")
    mu = np.zeros(features.shape[1], dtype=np.float64)
    for start in range(0, n, chunk):
        mu += features[start:start + chunk].astype(np.float64).sum(axis=0)
    mu /= n
    cov = np.zeros((features.shape[1],) * 2, dtype=np.float64)
    for start in range(0, n, chunk):
        x = features[start:start + chunk].astype(np.float64) - mu  # (chunk, D)
        cov += x.T @ x
    return mu, cov / (n - 1)


class RunningGaussian:
    """Mean and covariance accumulated batch by batch in float64 (sums of x and x x^T, as EDM's
    `fid.py ref`), so reference statistics of 1.28M images never hold all features at once."""

    def __init__(self, dim: int):
        self.n, self.sum = 0, np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch, dtype=np.float64)  # (B, D)
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 whatever the input dtypes.

    tr((S1 S2)^(1/2)) equals tr((R S2 R)^(1/2)) with R = S1^(1/2): the same eigenvalues, but
    R S2 R is symmetric, so two `eigh` calls give it exactly real and finite even when N < D
    makes both covariances singular (ADM instead retries `sqrtm` with 1e-6 added).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}")
    for name, x in (("mu", mu1), ("sigma", sigma1), ("reference mu", mu2), ("reference sigma", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has non-finite values; the features or the reference are broken")
    root = _sqrt_psd(sigma1)
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_to_features(features: np.ndarray, mu2, sigma2) -> float:
    """`frechet_distance(*gaussian_stats(features), mu2, sigma2)`, cheaper and more exact when
    there are fewer samples N than dimensions D (small runs, quickstart, rFID on a val subset).

    With A the centred features over sqrt(N - 1), S1 = A^T A, and S1 S2 has the same non-zero
    eigenvalues as the N x N matrix A S2 A^T: one small `eigvalsh` replaces two D x D
    decompositions, and the D - N zero eigenvalues of S1 add no round-off.
    """
    features = np.asarray(features)
    n, d = features.shape
    if n >= d:
        return frechet_distance(*gaussian_stats(features), mu2, sigma2)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"features are {d}-d but the statistics are {mu2.shape}, {sigma2.shape}")
    for name, x in (("features", features), ("reference mu", mu2), ("reference sigma", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has non-finite values; the features or the reference are broken")
    mu1 = features.astype(np.float64).mean(axis=0)
    a = (features.astype(np.float64) - mu1) / np.sqrt(n - 1)  # (N, D)
    inner = np.linalg.eigvalsh(a @ sigma2 @ a.T)  # (N,) eigenvalues of A S2 A^T
    diff = mu1 - mu2
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(diff @ diff + (a * a).sum() + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = 10, shuffle_seed: int | None = 2020
                    ) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over the splits.

    `logits` are pool3 . W without the bias (torch-fidelity `logits_unbiased`, ADM's
    softmax/logits MatMul). Split i is rows [i*N//splits, (i+1)*N//splits) after a
    permutation by `RandomState(shuffle_seed)` (torch-fidelity's rule); `shuffle_seed=None`
    keeps the given order (ADM's rule, which equals it only for randomly ordered samples).
    """
    x = torch.as_tensor(np.ascontiguousarray(logits), dtype=torch.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < splits:
        raise ValueError(f"IS needs (N, classes) logits with N >= splits={splits}, got {tuple(x.shape)}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, C)
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log mean_x p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances, ||a||^2 - 2 a.b + ||b||^2 clamped at 0 (ADM's form)."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def _row_block(n_cols: int, budget: int = 1 << 27) -> int:
    return max(1, budget // max(n_cols, 1))  # keeps each distance block under ~512 MB of float32


def manifold_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour (itself not counted)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {features.shape[0]}")
    radii = []
    for block in features.split(_row_block(features.shape[0])):
        # index k of the sorted row is the k-th neighbour: index 0 is the point itself
        radii.append(_squared_distances(block, features).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` within radius of at least one center (distance <= radius, as ADM)."""
    inside = []
    for block in points.split(_row_block(centers.shape[0])):
        inside.append((_squared_distances(block, centers) <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def nearest_label_agreement(samples, labels, reference, ref_labels) -> dict:
    """How often a sample's nearest reference point (Euclidean) has the sample's label.

    A direct check that a conditional generator draws its class, where classes separate in the
    space compared (raw pixels of the `shapes` dataset, or features). Returns the overall
    fraction, the fraction per label and the median distance to the nearest reference point.
    """
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float32).flatten(1)
    r = torch.as_tensor(np.asarray(reference), dtype=torch.float32).flatten(1)
    y, ry = np.asarray(labels), np.asarray(ref_labels)
    if x.shape[1] != r.shape[1] or len(x) != len(y) or len(r) != len(ry) or not len(x) or not len(r):
        raise ValueError(f"nearest_label_agreement: {len(x)} samples of size {x.shape[1]} with "
                         f"{len(y)} labels against {len(r)} references of size {r.shape[1]} with "
                         f"{len(ry)} labels; sizes must match and both sets be non-empty")
    nearest, dist = [], []
    for block in x.split(_row_block(r.shape[0])):
        d = _squared_distances(block, r).min(dim=1)
        nearest.append(d.indices)
        dist.append(d.values)
    agree = ry[torch.cat(nearest).numpy()] == y
    return {"agreement": float(agree.mean()),
            "per_label": {int(k): float(agree[y == k].mean()) for k in np.unique(y)},
            "median_distance": float(torch.cat(dist).sqrt().median())}


def precision_recall(ref_features, sample_features, k: int = 3, device: str | torch.device = "cpu"
                     ) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with ADM's definitions.

    Precision: fraction of samples inside the reference manifold (the union of balls around
    each reference point reaching its k-th neighbour); recall: fraction of reference points
    inside the sample manifold. Float32 distances on `device`.
    """
    ref = torch.as_tensor(np.ascontiguousarray(ref_features), dtype=torch.float32, device=device)
    sam = torch.as_tensor(np.ascontiguousarray(sample_features), dtype=torch.float32, device=device)
    precision = _fraction_inside(sam, ref, manifold_radii(ref, k))
    recall = _fraction_inside(ref, sam, manifold_radii(sam, k))
    return precision, recall


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (KID's kernel)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = x.shape[0]
    off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diag - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(features, ref_features, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (Binkowski et al. 2018) as torch-fidelity computes it: the mean and std over
    `subsets` random subset pairs of the unbiased polynomial-kernel MMD^2, float64."""
    a = np.asarray(features, dtype=np.float64)
    b = np.asarray(ref_features, dtype=np.float64)
    if min(len(a), len(b)) < subset_size or subset_size < 2:
        raise ValueError(f"KID subset size {subset_size} needs at least that many features in both "
                         f"sets (have {len(a)} and {len(b)})")
    rng = np.random.RandomState(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), subset_size, replace=False)],
                             b[rng.choice(len(b), subset_size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
