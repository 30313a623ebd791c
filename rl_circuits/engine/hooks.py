"""Node names as TransformerLens hooks: where each node of every graph lives in a
HookedTransformer, and the cfg flags under which those hooks fire.

A node name is a hook name, or a hook name with a head index (`blocks.0.attn.hook_result[3]`,
`blocks.0.hook_k_input[3]`): then the node is slice `[:, :, head]` of that hook's activation
[batch, pos, head, d_model]. Several hooks fire only under a cfg flag (`use_split_qkv_input`,
`use_attn_in`, `use_attn_result`, `use_hook_mlp_in`); `hooks_enabled` sets exactly those, and
ungroups keys and values where a name needs one copy per query head, so that every name fires
and means in TransformerLens what it means in the scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from transformer_lens import HookedTransformer

from rl_circuits.engine import tl_compat
from rl_circuits.engine.graph import parse_node


def hook_point(model: HookedTransformer, name: str) -> tuple[str, int | None]:
    """A node name -> (the TransformerLens hook that holds it, head index or None).

    `"blocks.1.attn.hook_result[2]"` -> `("blocks.1.attn.hook_result", 2)`: head 2's output is
    `cache["blocks.1.attn.hook_result"][:, :, 2]`. Run inside `hooks_enabled(model, [name])`,
    where the hook fires. Raises ValueError for a hook the model lacks or a head out of range.
    """
    hook, head = parse_node(name)
    if hook not in model.hook_dict:
        near = [h for h in model.hook_dict if h.endswith(hook.split(".")[-1])][:3]
        raise ValueError(
            f"node {name!r}: the model has no hook point {hook!r}"
            + (f" (it has e.g. {', '.join(near)})" if near else "")
            + "; use a node name of rl_circuits.build_graph(...) for this model"
        )
    if head is not None:
        if not hook.endswith(tl_compat.HEAD_AXIS_HOOKS):
            raise ValueError(
                f"node {name!r}: hook {hook!r} has no head axis; a head index goes only on "
                + ", ".join(tl_compat.HEAD_AXIS_HOOKS)
            )
        if head >= model.cfg.n_heads:
            raise ValueError(
                f"node {name!r}: head {head} is out of range; the model has "
                f"{model.cfg.n_heads} heads per layer (0..{model.cfg.n_heads - 1})"
            )
    return hook, head


def required_flags(model: HookedTransformer, names: Iterable[str]) -> dict[str, bool]:
    """The cfg flags under which every node in `names` (or one name) fires with the meaning of
    its name.

    Raises ValueError for names that need contradicting flags: `hook_attn_in` (every head's
    input at once) is computed but bypassed while the split q/k/v inputs are on.
    """
    flags: dict[str, bool] = {}
    wants: dict[tuple[str, bool], str] = {}
    for name in [names] if isinstance(names, str) else names:
        hook, head = hook_point(model, name)
        for flag, value in tl_compat.hook_flags(hook, per_query_head=head is not None).items():
            other = wants.get((flag, not value))
            if other is not None:
                raise ValueError(
                    f"nodes {other!r} and {name!r} need {flag} set both ways: TransformerLens "
                    "cannot fire both in one pass; enable them in separate hooks_enabled blocks "
                    "(they belong to different graphs)"
                )
            wants.setdefault((flag, value), name)
            flags[flag] = value
    return flags


@contextmanager
def hooks_enabled(model: HookedTransformer, names: Iterable[str]) -> Iterator[HookedTransformer]:
    """Make the hooks of `names` (node names of any graph) fire; the model's flags restored on
    exit, also after an error.

    Inside, `model.run_with_cache(tokens, names_filter=[hook_point(model, n)[0] for n in
    names])` caches every node and `model.run_with_hooks` fires on each. Only the flags those
    names need are changed (they leave the model's function unchanged).
    """
    with tl_compat.flags_set(model, required_flags(model, names)):
        yield model
