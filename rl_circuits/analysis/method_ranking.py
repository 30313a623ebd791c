"""Which attribution method to trust on a model: each method's MIB faithfulness curve, CPR, CMD
and its rank agreement with `exact` on a subsample of edges (issue 25).

For one batch of questions and each method: attribute, rank the edges by the mean score over
the questions, run the top int(x n_edges) edges for x in MIB's grid (`MIB_FRACTIONS`) with
`evaluate_circuit` under the same ablation, and summarise the curve as MIB does (f the ratio of
mean losses, CPR and CMD by the trapezoid rule), with a percentile bootstrap interval over
questions (batch by batch). `exact` scores of `n_exact` edges drawn at random (seeded) are
measured once, with the all-edges circuit minus that one edge, and each method's mean scores on
those edges are compared with them by Spearman's rank correlation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from scipy.stats import spearmanr
from transformer_lens import HookedTransformer

from rl_circuits.analysis.faithfulness import MIB_FRACTIONS, cmd, cpr, mib_edge_counts
from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.circuits import evaluate_circuit, top_k_circuits


def mib_faithfulness(losses: np.ndarray, clean: np.ndarray, none: np.ndarray) -> np.ndarray:
    """MIB's f per grid point: (mean L_none - mean L_k) / (mean L_none - mean L_clean), the
    means over questions (the last axis); `losses` [k, n] gives [k]."""
    span = none.mean(-1) - clean.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (none.mean(-1)[..., None] - losses.mean(-1)) / span[..., None]


def rank_methods(
    model: HookedTransformer,
    batches: Sequence[tuple[Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]],
    methods: Sequence[str],
    graph: str = "paper",
    *,
    ablation: str = "zero",
    ranking: str = "abs",
    fractions: Sequence[float] = MIB_FRACTIONS,
    n_exact: int = 64,
    seed: int = 0,
    n_resamples: int = 1000,
    ci: float = 0.95,
    ig_steps: int = 8,
) -> list[dict]:
    """One row per method over the questions of `batches` (tokens, loss_mask; each batch is
    attributed and evaluated alone): its curve (`fractions`, `ks`, `f`), `cpr` and `cmd` with
    bootstrap intervals over questions (`cpr_low`, ...), `spearman` with exact on the subsample,
    the number of downstream nodes it leaves `unscored` (RelP: q/k inputs) and `seconds` of
    attribution per question. Ablations are those without extra inputs (zero, mean)."""
    n = sum(len(tokens) for tokens, _ in batches)
    if n < 2:
        raise ValueError("rank_methods needs at least 2 questions (intervals are over questions)")
    if n_exact < 2:
        raise ValueError(f"n_exact must be >= 2 edges for a rank correlation, got {n_exact}")
    rng = np.random.default_rng(seed)
    tail = (1 - ci) / 2 * 100
    draws = rng.integers(0, n, size=(n_resamples, n))
    rows, exact = [], None
    for method in methods:
        start, parts = time.perf_counter(), []
        for tokens, loss_mask in batches:
            parts.append(
                attribute(
                    model, tokens, loss_mask, graph, method, ablation=ablation, ig_steps=ig_steps
                )
            )
        seconds = (time.perf_counter() - start) / n
        mask = parts[0].edge_mask.numpy()
        values = np.concatenate([p.values.double().numpy() for p in parts])
        if exact is None:  # the same edges and clean losses for every method
            exact = _exact_sample(model, batches, graph, mask, n_exact, rng, ablation)
        ks = mib_edge_counts(int(mask.sum()), fractions)
        key = np.abs(values).mean(0) if ranking == "abs" else values.mean(0)
        circuits = torch.from_numpy(top_k_circuits(key, mask, ks, ranking))
        empty = torch.zeros((1, *mask.shape), dtype=torch.bool)
        out = _losses(model, batches, torch.cat([empty, circuits]), graph, ablation)
        none, losses, clean = out[0], out[1:], exact["clean"]
        f = mib_faithfulness(losses, clean, none)
        boot_f = mib_faithfulness(losses[:, draws].transpose(1, 0, 2), clean[draws], none[draws])
        edges = exact["edges"]
        rho = spearmanr(values[:, edges[:, 0], edges[:, 1]].mean(0), exact["scores"]).statistic
        row = {
            "method": method,
            "fractions": list(fractions),
            "ks": ks,
            "f": f.tolist(),
            "cpr": float(cpr(fractions, f)),
            "cmd": float(cmd(fractions, f)),
            "spearman": float(rho),
            "n_exact": len(edges),
            "n": n,
            "unscored": len(parts[0].meta.get("unscored", [])),
            "seconds": seconds,
        }
        for name, fn in (("cpr", cpr), ("cmd", cmd)):
            low, high = np.percentile(fn(fractions, boot_f), [tail, 100 - tail])
            row[f"{name}_low"], row[f"{name}_high"] = float(low), float(high)
        rows.append(row)
    return rows


def _losses(model, batches, circuits, graph, ablation) -> np.ndarray:
    """[k, n] losses of the circuits, batch after batch."""
    return np.concatenate(
        [
            evaluate_circuit(model, tokens, mask, circuits, graph, ablation=ablation)
            .double()
            .numpy()
            for tokens, mask in batches
        ],
        axis=1,
    )


def _exact_sample(model, batches, graph, mask, n_exact, rng, ablation) -> dict:
    """`n_exact` edges drawn without replacement, each one's exact score (mean over questions
    of the loss without it minus the clean loss), and the clean loss per question."""
    flat = np.flatnonzero(mask.ravel())
    pick = np.sort(rng.choice(flat, size=min(n_exact, flat.size), replace=False))
    edges = np.stack(np.unravel_index(pick, mask.shape), 1)
    full = torch.from_numpy(mask)
    circuits = full.repeat(len(edges) + 1, 1, 1)
    circuits[torch.arange(1, len(edges) + 1), edges[:, 0], edges[:, 1]] = False
    out = _losses(model, batches, circuits, graph, ablation)
    return {"edges": edges, "scores": (out[1:] - out[0]).mean(1), "clean": out[0]}
