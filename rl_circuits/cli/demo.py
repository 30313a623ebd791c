"""`rl-circuits demo`: build the toy zoo if absent, run the whole study on it, print Table 1."""

from __future__ import annotations

import json
from pathlib import Path

from rl_circuits.config import SelectSection
from rl_circuits.errors import ConfigError
from rl_circuits.resources import resource_dir
from rl_circuits.store.atomic import write_atomic
from rl_circuits.store.layout import RunLayout

DEFAULT_SUBSET = SelectSection().subset  # the paper's: questions both models answer right


def demo_config_text(data_dir: Path, subset: str = DEFAULT_SUBSET) -> str:
    """`configs/demo.toml` pointed at the zoo's data directory, selecting from `subset`."""
    text = (resource_dir("configs") / "demo.toml").read_text()
    if subset != DEFAULT_SUBSET:
        text = text.replace("\n[select]\n", f"\n[select]\nsubset = {json.dumps(subset)}\n", 1)
    return f"data_dir = {json.dumps(str(data_dir))}\n{text}"


def run_demo(
    run_dir: str | None = None, progress: bool = True, subset: str = DEFAULT_SUBSET
) -> int:
    """Zoo, then every stage of `configs/demo.toml` on the questions of `subset` (default: both
    models right, as the paper; `only_after`: those post-training fixed); a second run reuses
    everything."""
    from rl_circuits.analysis.reader import load_run
    from rl_circuits.data.selection import SUBSETS
    from rl_circuits.pipeline.run import run_pipeline
    from rl_circuits.zoo import build_zoo, summary_lines
    from rl_circuits.zoo.claims import compare_with_readme, load_claims
    from rl_circuits.zoo.numerics import bitwise_note

    if subset not in SUBSETS:
        raise ConfigError(f"demo --subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    note = bitwise_note()
    if note is not None:
        print(note)
    zoo = build_zoo(progress=progress)
    print(f"zoo: {zoo.root}")
    for line in summary_lines(zoo):
        print(f"  {line}")
    print(f"  {compare_with_readme(zoo.accuracy, zoo.config.task.test_size, load_claims())}")
    # the run's config, next to the zoo it belongs to
    name = "demo" if subset == DEFAULT_SUBSET else f"demo-{subset}"
    config = zoo.root / f"{name}.toml"
    write_atomic(config, demo_config_text(zoo.data_dir, subset), if_changed=True)
    root = run_pipeline(config, run_dir=run_dir or f"runs/{name}", progress=progress)
    run = load_run(root)
    print()
    print(run.table1().to_markdown())
    print(f"\nreport: {run.root.resolve() / RunLayout.REPORT_HTML}")
    return 0
