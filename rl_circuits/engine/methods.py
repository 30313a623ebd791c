"""The attribution methods and ablations, declared once: `attribute`, `evaluate_circuit`, the
config and docs/metrics.md read this table (as auto-circuit's `PruneAlgo` table).

An ablation says what O'_u, the counterfactual value of upstream output O_u, is: `zero` (0),
`mean` (O_u averaged over the mean data's positions), `mean-positional` (averaged per position),
`patch` (O_u in the run of `corrupted_model or model` on `corrupted_tokens or tokens`). A
gradient method is the list of forward/backward passes whose input gradients it averages;
every one scores edge (u, d) as <mean gradient at H_d, O'_u - O_u>. Adding a method is one
entry here (its passes) and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

ABLATIONS: tuple[str, ...] = ("zero", "mean", "mean-positional", "patch")
# Ablations that need no input beyond the clean tokens (the pipeline's circuits stage offers these).
PLAIN_ABLATIONS: tuple[str, ...] = ("zero", "mean", "mean-positional")
IG_RULES: tuple[str, ...] = ("right", "left")
# RelP's propagation rules (`rl_circuits.engine.relp` applies them): a norm's scale, the
# attention pattern constant; the gated product by the half rule, SiLU by the identity rule.
RELP_RULES: tuple[str, ...] = ("norm-scale", "attention-pattern", "half", "identity")


@dataclass(frozen=True)
class Pass:
    """One forward and backward pass of a gradient method.

    `t`: the input embedding is E' + t (E - E') (E' its counterfactual; t * E under zero
    ablation). `node`: an output of the paper graph (`hook_embed`, `blocks.{l}.hook_attn_out`,
    `blocks.{l}.hook_mlp_out`) replaced by the constant O'_n + t (O_n - O'_n) instead (as
    EAP-IG-activations: no gradient flows back through it). `corrupted`: the pass reads
    `corrupted_tokens` (the loss still scores the clean tokens). `rules`: RelP's propagation
    rules its backward pass applies (`RELP_RULES`; none: plain gradients).
    """

    t: float = 1.0
    node: str | None = None
    corrupted: bool = False
    rules: tuple[str, ...] = ()


CLEAN = Pass()


def runs_clean(step: Pass) -> bool:
    """Whether the pass's forward is the clean run (its rules change only the backward pass), so
    it can record the clean outputs and loss."""
    return replace(step, rules=()) == CLEAN


@dataclass(frozen=True)
class Method:
    """An attribution method: which ablations it is defined for, whether O'_u may come from
    another model, and its passes (None: `exact`, one forward per edge)."""

    name: str
    summary: str
    ablations: tuple[str, ...]
    cross_model: bool
    passes: Callable[[int, int, str], list[Pass]] | None


def ig_points(steps: int, rule: str) -> list[float]:
    """The Riemann points t of an `steps`-point rule on [0, 1]: `right` t = 1, (n-1)/n, ..., 1/n
    (the real input first), `left` t = 0, 1/n, ..., (n-1)/n (EAP-IG's EAP-IG-inputs)."""
    if rule == "right":
        return [k / steps for k in range(steps, 0, -1)]
    if rule == "left":
        return [k / steps for k in range(steps)]
    raise ValueError(f"unknown ig_rule {rule!r}; choose one of {', '.join(IG_RULES)}")


def paper_outputs(n_layers: int) -> list[str]:
    """The outputs EAP-IG-activations interpolates: the embedding, each attention layer (all its
    heads at once) and each MLP."""
    nodes = ["hook_embed"]
    for layer in range(n_layers):
        nodes += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return nodes


def _eap(n_layers: int, steps: int, rule: str) -> list[Pass]:
    return [CLEAN]


def _eap_ig(n_layers: int, steps: int, rule: str) -> list[Pass]:
    return [Pass(t=t) for t in ig_points(steps, rule)]


def _eap_ig_activations(n_layers: int, steps: int, rule: str) -> list[Pass]:
    points = ig_points(steps, rule)
    return [Pass(t=t, node=node) for node in paper_outputs(n_layers) for t in points]


def _relp(n_layers: int, steps: int, rule: str) -> list[Pass]:
    return [Pass(rules=RELP_RULES)]


def _clean_corrupted(n_layers: int, steps: int, rule: str) -> list[Pass]:
    return [CLEAN, Pass(corrupted=True)]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "eap",
            "gradient at the clean input (one forward, one backward)",
            ABLATIONS,
            True,
            _eap,
        ),
        Method(
            "eap-ig",
            "gradients averaged over inputs E' + t (E - E') (EAP-IG-inputs)",
            ABLATIONS,
            False,
            _eap_ig,
        ),
        Method(
            "eap-ig-activations",
            "gradients averaged over each output O'_n + t (O_n - O'_n) in turn",
            ABLATIONS,
            True,
            _eap_ig_activations,
        ),
        Method(
            "relp",
            "the clean pass with RelP's rules in the backward pass (no relevance reaches q or k)",
            ABLATIONS,
            True,
            _relp,
        ),
        Method(
            "clean-corrupted",
            "gradients averaged over the clean and the corrupted input",
            ("patch",),
            False,
            _clean_corrupted,
        ),
        Method(
            "exact",
            "loss with O_u replaced by O'_u in H_d, one edge per forward",
            ABLATIONS,
            True,
            None,
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def methods_for(ablation: str, cross_model: bool = False) -> tuple[str, ...]:
    """The methods defined for `ablation` (and for O'_u from another model)."""
    return tuple(
        m.name
        for m in METHODS.values()
        if ablation in m.ablations and (m.cross_model or not cross_model)
    )


def check_ablation(ablation: str) -> None:
    """Refuse an unknown ablation, naming the known ones."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")


def check(method: str, ablation: str, cross_model: bool) -> Method:
    """The method's entry, or a ValueError naming the combinations that work."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    check_ablation(ablation)
    entry = METHODS[method]
    if ablation not in entry.ablations:
        raise ValueError(
            f"method {method!r} is not defined for ablation={ablation!r}; it works with "
            f"{', '.join(entry.ablations)}, and ablation={ablation!r} with methods "
            f"{', '.join(methods_for(ablation))}"
        )
    if cross_model and not entry.cross_model:
        raise ValueError(
            f"method {method!r} cannot patch from another model (corrupted_model): it needs one "
            f"input path through both runs; use one of {', '.join(methods_for('patch', True))}, or "
            "corrupted_tokens without corrupted_model"
        )
    return entry
