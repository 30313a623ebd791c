"""rl-circuits: edge attribution patching to compare a model before and after post-training.

model = rl_circuits.load_model("RLHFlow/Qwen2.5-7B-SFT", dtype=torch.bfloat16)
scores = rl_circuits.attribute(model, tokens, loss_mask, graph="paper", method="eap")
run = rl_circuits.load_run("runs/paper"); run.table1()
"""

from importlib import import_module

_EXPORTS = {
    "load_model": "rl_circuits.models.loading",
    "attribute": "rl_circuits.engine.attribution",
    "EdgeScores": "rl_circuits.engine.scores",
    "masked_nll": "rl_circuits.engine.attribution",
    "evaluate_circuit": "rl_circuits.engine.circuits",
    "build_graph": "rl_circuits.engine.graph",
    "parse_node": "rl_circuits.engine.graph",
    "hook_point": "rl_circuits.engine.hooks",
    "hooks_enabled": "rl_circuits.engine.hooks",
    "load_run": "rl_circuits.analysis.reader",
    "compare": "rl_circuits.analysis.stats",
    "table1": "rl_circuits.analysis.reader",
    "load_config": "rl_circuits.config",
    "weight_diff": "rl_circuits.models.weight_diff",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use: `import rl_circuits` stays cheap for the CLI and tools."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rl_circuits' has no attribute {name!r}")
