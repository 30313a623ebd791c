"""Summary statistics of edge-score tensors W [batch, n_upstream, n_downstream] (Sec. 4.2).

The paper compares a model before and after post-training through a few scalars computed from
its edge attribution scores: activation intensity (Eq. 14), information complexity (Eq. 15),
distribution kurtosis (Eq. 16), sample diversity (Figure 3a), plus per-node output-edge entropy
(Figure 3b) and per-edge relative change (Figure 2). Every function takes numpy or torch input
(or a score object, `EdgeScores`) and is pure. `edge_mask=None` uses every matrix entry, zeros
of non-edges included, as the paper's equations read ("all"); a boolean mask restricts them to
the existing edges ("valid").
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import numpy as np
import torch
from jaxtyping import Bool, Float, Float64

from rl_circuits.engine.scores import EdgeScores

# One matrix per sample (the axis is `batch`, as in the engine); a score object gives its values.
ScoreArray = (
    Float[np.ndarray, "batch n_upstream n_downstream"]
    | Float[torch.Tensor, "batch n_upstream n_downstream"]
    | EdgeScores
)
# The same edges scored on other samples (their own sample axis): the other side of a comparison
# that does not pair the samples.
OtherScoreArray = (
    Float[np.ndarray, "other_batch n_upstream n_downstream"]
    | Float[torch.Tensor, "other_batch n_upstream n_downstream"]
    | EdgeScores
)
Mask = Bool[np.ndarray, "n_upstream n_downstream"] | Bool[torch.Tensor, "n_upstream n_downstream"]
EdgeMap = Float[np.ndarray, "n_upstream n_downstream"]
Checked = Float64[np.ndarray, "batch n_upstream n_downstream"]  # what `check_scores` returns

__all__ = [
    "METRICS",
    "activation_intensity",
    "activation_intensity_per_sample",
    "check_mask",
    "check_scores",
    "distribution_kurtosis",
    "flat_entries",
    "information_complexity",
    "kurtosis_per_sample",
    "output_entropy",
    "relative_change",
    "sample_correlations",
    "sample_diversity",
]


def _array(x, dtype=np.float64) -> np.ndarray:
    """A numpy view of a numpy array or a (detached, CPU) torch tensor of any dtype; score
    objects (`EdgeScores`) give their `values`."""
    if not isinstance(x, torch.Tensor | np.ndarray) and hasattr(x, "values"):
        x = x.values
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"expected edge scores (a tensor, an array or a score object), got "
            f"{type(x).__name__}: {exc}"
        ) from None


def check_scores(W: object) -> Checked:
    """W (a tensor, an array or a score object) as float64 [batch, n_upstream, n_downstream],
    checked (3-d, not empty, finite); else ValueError saying what is wrong."""
    W = _array(W)
    if W.ndim != 3:
        raise ValueError(
            f"edge scores must be [batch, n_upstream, n_downstream], got shape {W.shape}"
        )
    if W.shape[0] == 0:
        raise ValueError("edge scores hold no samples")
    if not np.isfinite(W).all():
        bad = np.argwhere(~np.isfinite(W))[0]
        raise ValueError(
            f"edge scores hold NaN/inf (first at sample {bad[0]}, entry {tuple(bad[1:])}); "
            "recompute them (in float32) or drop that sample"
        )
    return W


def check_mask(edge_mask: object, W: Checked) -> Bool[np.ndarray, "n_upstream n_downstream"] | None:
    """The boolean mask, checked against W's matrix shape (None stays None); else ValueError."""
    if edge_mask is None:
        return None
    mask = _array(edge_mask, dtype=bool)
    if mask.shape != W.shape[1:]:
        raise ValueError(f"edge_mask has shape {mask.shape}, scores have matrices {W.shape[1:]}")
    if not mask.any():
        raise ValueError("edge_mask selects no edges")
    return mask


def flat_entries(W: ScoreArray, edge_mask: Mask | None = None) -> Float64[np.ndarray, "batch m"]:
    """Each sample's matrix flattened [batch, m]: all entries, or only the masked ones."""
    W = check_scores(W)
    mask = check_mask(edge_mask, W)
    return W.reshape(len(W), -1) if mask is None else W[:, mask]


def activation_intensity_per_sample(
    W: ScoreArray, edge_mask: Mask | None = None
) -> Float64[np.ndarray, " batch"]:
    """Mean |W| of each sample's matrix (their mean is Eq. 14)."""
    return np.abs(flat_entries(W, edge_mask)).mean(axis=1)


def activation_intensity(W: ScoreArray, edge_mask: Mask | None = None) -> float:
    """Act. Intens. (Eq. 14): mean |W| over samples and entries."""
    return float(activation_intensity_per_sample(W, edge_mask).mean())


def information_complexity(
    W: ScoreArray, edge_mask: Mask | None = None, bins: int = 100, eps: float = 1e-12
) -> float:
    """Info. Complex. (Eq. 15): entropy (nats) of a `bins`-bin histogram of all |W| values."""
    values = np.abs(flat_entries(W, edge_mask)).ravel()
    counts, _ = np.histogram(values, bins=bins)
    p = counts / counts.sum()
    return float(-(p * np.log(p + eps)).sum())


def kurtosis_per_sample(
    W: ScoreArray, edge_mask: Mask | None = None
) -> Float64[np.ndarray, " batch"]:
    """Excess kurtosis (population moments) of each sample's entries; NaN for a constant one."""
    x = flat_entries(W, edge_mask)
    x = x - x.mean(axis=1, keepdims=True)
    m2 = (x**2).mean(axis=1)
    m4 = (x**4).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m2 > 0, m4 / m2**2 - 3.0, np.nan)


def distribution_kurtosis(W: ScoreArray, edge_mask: Mask | None = None) -> float:
    """Dist. Kurt. (Eq. 16): per-sample excess kurtosis, averaged over samples."""
    return float(kurtosis_per_sample(W, edge_mask).mean())


def sample_correlations(
    W: ScoreArray, edge_mask: Mask | None = None
) -> Float64[np.ndarray, "batch batch"]:
    """Pearson correlation between every two samples' flattened (signed) matrices."""
    x = flat_entries(W, edge_mask)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt((x**2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = x / norm[:, None]
    return x @ x.T


def sample_diversity(W: ScoreArray, edge_mask: Mask | None = None) -> float:
    """Figure 3a: 1 - mean Pearson correlation over all pairs of distinct samples."""
    corr = sample_correlations(W, edge_mask)
    n = len(corr)
    if n < 2:
        raise ValueError("sample diversity needs at least 2 samples")
    return float(1.0 - corr[np.triu_indices(n, k=1)].mean())


def output_entropy(
    W: ScoreArray, edge_mask: Mask | None = None
) -> Float[np.ndarray, " n_upstream"]:
    """Figure 3b: per upstream node, entropy of its normalised outgoing |W|, mean over samples."""
    W = check_scores(W)
    mask = check_mask(edge_mask, W)
    a = np.abs(W) if mask is None else np.abs(W) * mask
    total = a.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, a / total, 0.0)
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=2).mean(axis=0)


def relative_change(W_before: ScoreArray, W_after: OtherScoreArray) -> EdgeMap:
    """Figure 2: (mean|W_after| - mean|W_before|) / mean|W_before| per edge; NaN where 0 before."""
    before, after = check_scores(W_before), check_scores(W_after)
    if before.shape[1:] != after.shape[1:]:
        raise ValueError(f"matrix shapes differ: {before.shape[1:]} vs {after.shape[1:]}")
    mb, ma = np.abs(before).mean(axis=0), np.abs(after).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mb > 0, (ma - mb) / mb, np.nan)


METRICS: MappingProxyType[str, Callable[..., float]] = MappingProxyType(
    {
        "activation_intensity": activation_intensity,
        "information_complexity": information_complexity,
        "distribution_kurtosis": distribution_kurtosis,
        "sample_diversity": sample_diversity,
    }
)
"""The scalar metrics compared before/after: Table 1's three, then sample diversity."""
