"""Which attribution method to trust on a model: each method's MIB faithfulness curve, CPR, CMD
and its rank agreement with `exact` on a subsample of edges.

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
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy.stats import spearmanr
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rl_circuits.analysis.faithfulness import MIB_FRACTIONS, cmd, cpr, mib_edge_counts
from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.circuits import evaluate_circuit, top_k_circuits


def mib_faithfulness(
    losses: Float[np.ndarray, "*rest k batch"],
    clean: Float[np.ndarray, "*rest batch"],
    none: Float[np.ndarray, "*rest batch"],
) -> Float[np.ndarray, "*rest k"]:
    """MIB's f per grid point: (mean L_none - mean L_k) / (mean L_none - mean L_clean), the
    means over questions (the last axis); `losses` [k, batch] gives [k]."""
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
    efficient_attention: bool = True,
    desc: str = "methods",
    progress: bool = False,
) -> list[dict]:
    """One row per method over the questions of `batches` (tokens, loss_mask; each batch is
    attributed and evaluated alone): its curve (`fractions`, `ks`, `f`), `cpr` and `cmd` with
    bootstrap intervals over questions (`cpr_low`, ...), `spearman` with exact on the subsample,
    the number of downstream nodes it leaves `unscored` (RelP: q/k inputs) and `seconds` of
    attribution per question. Ablations are those without extra inputs (zero, mean);
    `efficient_attention` as in `attribute` (the heads graph's circuits need it off)."""
    n = sum(len(tokens) for tokens, _ in batches)
    if n < 2:
        raise ValueError("rank_methods needs at least 2 questions (intervals are over questions)")
    if n_exact < 2:
        raise ValueError(f"n_exact must be >= 2 edges for a rank correlation, got {n_exact}")
    rng = np.random.default_rng(seed)
    tail = (1 - ci) / 2 * 100
    draws = rng.integers(0, n, size=(n_resamples, n))
    rows, exact, fused = [], None, efficient_attention
    for method in tqdm(methods, desc=desc, disable=not progress):
        start, parts = time.perf_counter(), []
        for tokens, loss_mask in batches:
            parts.append(
                attribute(
                    model,
                    tokens,
                    loss_mask,
                    graph,
                    method,
                    ablation=ablation,
                    ig_steps=ig_steps,
                    efficient_attention=efficient_attention,
                )
            )
        seconds = (time.perf_counter() - start) / n
        mask = parts[0].edge_mask.numpy()
        values = np.concatenate([p.values.double().numpy() for p in parts])
        if exact is None:  # the same edges and clean losses for every method
            exact = _exact_sample(model, batches, graph, mask, n_exact, rng, ablation, fused)
        ks = mib_edge_counts(int(mask.sum()), fractions)
        key = np.abs(values).mean(0) if ranking == "abs" else values.mean(0)
        circuits = torch.from_numpy(top_k_circuits(key, mask, ks, ranking))
        empty = torch.zeros((1, *mask.shape), dtype=torch.bool)
        out = _losses(model, batches, torch.cat([empty, circuits]), graph, ablation, fused)
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


def _losses(model, batches, circuits, graph, ablation, fused: bool) -> np.ndarray:
    """[k, batch] losses of the circuits, one token batch after another."""
    return np.concatenate(
        [
            evaluate_circuit(
                model, tokens, mask, circuits, graph, ablation=ablation, efficient_attention=fused
            )
            .double()
            .numpy()
            for tokens, mask in batches
        ],
        axis=1,
    )


def _exact_sample(model, batches, graph, mask, n_exact, rng, ablation, fused: bool) -> dict:
    """`n_exact` edges drawn without replacement, each one's exact score (mean over questions
    of the loss without it minus the clean loss), and the clean loss per question."""
    flat = np.flatnonzero(mask.ravel())
    pick = np.sort(rng.choice(flat, size=min(n_exact, flat.size), replace=False))
    edges = np.stack(np.unravel_index(pick, mask.shape), 1)
    full = torch.from_numpy(mask)
    circuits = full.repeat(len(edges) + 1, 1, 1)
    circuits[torch.arange(1, len(edges) + 1), edges[:, 0], edges[:, 1]] = False
    out = _losses(model, batches, circuits, graph, ablation, fused)
    return {"edges": edges, "scores": (out[1:] - out[0]).mean(1), "clean": out[0]}


TABLE_COLUMNS = (
    "pair",
    "role",
    "dataset",
    "alpha",
    "method",
    "cpr",
    "cpr_low",
    "cpr_high",
    "cmd",
    "cmd_low",
    "cmd_high",
    "spearman",
    "n_exact",
    "n",
    "unscored",
    "seconds",
)


def method_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Methods as rows, one column per model and cell ("pair/role, dataset, alpha=a"), each
    entry "CPR c [low, high]; CMD d [low, high]; rho r" (`rows`: `Run.methods()`)."""
    if rows.empty:
        return pd.DataFrame()
    frame = rows.assign(
        column=[f"{r.pair}/{r.role}, {r.dataset}, alpha={r.alpha:g}" for r in rows.itertuples()],
        entry=[
            f"CPR {r.cpr:.2f} [{r.cpr_low:.2f}, {r.cpr_high:.2f}]; "
            f"CMD {r.cmd:.2f} [{r.cmd_low:.2f}, {r.cmd_high:.2f}]; rho {r.spearman:.2f}"
            for r in rows.itertuples()
        ],
    )
    order = list(dict.fromkeys(frame["method"]))
    table = frame.pivot(index="method", columns="column", values="entry")
    return table.loc[order, list(dict.fromkeys(frame["column"]))]


def method_verdicts(rows: pd.DataFrame, reference: str = "eap") -> list[str]:
    """Per model and cell: the method with the highest CPR, and whether it beats `reference`
    beyond both bootstrap intervals (its lower bound above the reference's upper bound)."""
    out = []
    for (pair, role, dataset, alpha), cell in rows.groupby(
        ["pair", "role", "dataset", "alpha"], sort=False
    ):
        best = cell.loc[cell["cpr"].idxmax()]
        where = f"{pair}/{role}, {dataset}, alpha={alpha:g}"
        ref = cell[cell["method"] == reference]
        if ref.empty or best["method"] == reference:
            out.append(f"{where}: {best['method']} has the highest CPR ({best['cpr']:.2f})")
            continue
        ref = ref.iloc[0]
        beyond = best["cpr_low"] > ref["cpr_high"]
        out.append(
            f"{where}: {best['method']} has the highest CPR ({best['cpr']:.2f} vs {reference} "
            f"{ref['cpr']:.2f}); "
            + ("more faithful beyond both intervals" if beyond else "the intervals overlap")
        )
    return out


def method_markdown(rows: pd.DataFrame) -> str:
    """The method table as Markdown, with the verdicts and each method's mean seconds of
    attribution per question underneath."""
    table = method_table(rows)
    if table.empty:
        return "No method ranking (set `[circuits] methods`).\n"
    head = ["method", *table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [
        "| " + " | ".join([method, *(str(v) for v in table.loc[method])]) + " |"
        for method in table.index
    ]
    cost = rows.groupby("method", sort=False)["seconds"].mean()
    lines += ["", *(f"- {v}" for v in method_verdicts(rows)), ""]
    lines.append(
        "Seconds of attribution per question: "
        + ", ".join(f"{m} {s:.3g}" for m, s in cost.items())
        + ". CPR/CMD: MIB's areas under f and |1 - f| over the fraction of edges (0.1% to "
        "100%), 95% bootstrap intervals over questions; rho: Spearman with exact on a seeded "
        "subsample of edges. relp gives q/k inputs no relevance (not scored, not unimportant)."
    )
    return "\n".join(lines) + "\n"
