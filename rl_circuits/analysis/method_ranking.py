"""Which attribution method to trust on a model: each method's MIB faithfulness curve, CPR, CMD
and its rank agreement with `exact` on a subsample of edges (issue 25).

For one batch of questions and each method: attribute, rank the edges by the mean score over
the questions, run the top int(x n_edges) edges for x in MIB's grid (`MIB_FRACTIONS`) with
`evaluate_circuit` under the same ablation, and summarise the curve as MIB does (f the ratio of
mean losses, CPR and CMD by the trapezoid rule), with a percentile bootstrap interval over
questions. `exact` scores of `n_exact` edges drawn at random (seeded) are measured once, with
the all-edges circuit minus that one edge, and each method's mean scores on those edges are
compared with them by Spearman's rank correlation.
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
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
    methods: Sequence[str],
    graph: str = "paper",
    *,
    ablation: str = "zero",
    corrupted_tokens: Int[torch.Tensor, "batch pos"] | None = None,
    ranking: str = "abs",
    fractions: Sequence[float] = MIB_FRACTIONS,
    n_exact: int = 64,
    seed: int = 0,
    n_resamples: int = 1000,
    ci: float = 0.95,
    ig_steps: int = 8,
) -> list[dict]:
    """One row per method: its curve (`fractions`, `ks`, `f`), `cpr` and `cmd` with bootstrap
    intervals over questions (`cpr_low`, ...), `spearman` with exact on the subsample, the
    number of downstream nodes it leaves `unscored` (RelP: q/k inputs) and `seconds` per
    question of its attribution."""
    if len(tokens) < 2:
        raise ValueError("rank_methods needs at least 2 questions (intervals are over questions)")
    if n_exact < 2:
        raise ValueError(f"n_exact must be >= 2 edges for a rank correlation, got {n_exact}")
    patch = {"corrupted_tokens": corrupted_tokens} if corrupted_tokens is not None else {}
    rng = np.random.default_rng(seed)
    rows, exact = [], None
    for method in methods:
        start = time.perf_counter()
        scores = attribute(
            model, tokens, loss_mask, graph, method, ablation=ablation, ig_steps=ig_steps, **patch
        )
        seconds = (time.perf_counter() - start) / len(tokens)
        mask = scores.edge_mask.numpy()
        values = scores.values.double().numpy()
        if exact is None:  # the same edges and losses for every method
            exact = _exact_sample(
                model, tokens, loss_mask, graph, mask, n_exact, rng, ablation, patch
            )
        ks = mib_edge_counts(int(mask.sum()), fractions)
        key = np.abs(values).mean(0) if ranking == "abs" else values.mean(0)
        circuits = torch.from_numpy(top_k_circuits(key, mask, ks, ranking))
        empty = torch.zeros((1, *mask.shape), dtype=torch.bool)
        out = (
            evaluate_circuit(
                model,
                tokens,
                loss_mask,
                torch.cat([empty, circuits]),
                graph,
                ablation=ablation,
                **patch,
            )
            .double()
            .numpy()
        )
        none, losses, clean = out[0], out[1:], exact["clean"]
        f = mib_faithfulness(losses, clean, none)
        draws = rng.integers(0, len(tokens), size=(n_resamples, len(tokens)))
        boot_f = mib_faithfulness(losses[:, draws].transpose(1, 0, 2), clean[draws], none[draws])
        tail = (1 - ci) / 2 * 100
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
            "unscored": len(scores.meta.get("unscored", [])),
            "seconds": seconds,
        }
        for name, fn in (("cpr", cpr), ("cmd", cmd)):
            low, high = np.percentile(fn(fractions, boot_f), [tail, 100 - tail])
            row[f"{name}_low"], row[f"{name}_high"] = float(low), float(high)
        rows.append(row)
    return rows


def _exact_sample(model, tokens, loss_mask, graph, mask, n_exact, rng, ablation, patch) -> dict:
    """`n_exact` edges drawn without replacement, each one's exact score (mean over questions
    of the loss without it minus the clean loss), and the clean loss per question."""
    flat = np.flatnonzero(mask.ravel())
    pick = np.sort(rng.choice(flat, size=min(n_exact, flat.size), replace=False))
    edges = np.stack(np.unravel_index(pick, mask.shape), 1)
    full = torch.from_numpy(mask)
    circuits = full.repeat(len(edges) + 1, 1, 1)
    circuits[torch.arange(1, len(edges) + 1), edges[:, 0], edges[:, 1]] = False
    out = (
        evaluate_circuit(model, tokens, loss_mask, circuits, graph, ablation=ablation, **patch)
        .double()
        .numpy()
    )
    return {"edges": edges, "scores": (out[1:] - out[0]).mean(1), "clean": out[0]}
