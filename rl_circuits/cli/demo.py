"""`rl-circuits demo`: build the toy zoo if absent, run the whole study on it, print Table 1."""

from __future__ import annotations

import json

from rl_circuits.resources import resource_dir
from rl_circuits.store.atomic import write_atomic
from rl_circuits.store.layout import RunLayout


def run_demo(run_dir: str | None = None, progress: bool = True) -> int:
    """Zoo, then every stage of `configs/demo.toml`; a second run reuses everything."""
    from rl_circuits.analysis.reader import load_run
    from rl_circuits.pipeline.run import run_pipeline
    from rl_circuits.zoo import build_zoo, summary_lines
    from rl_circuits.zoo.claims import compare_with_readme, load_claims
    from rl_circuits.zoo.numerics import bitwise_note

    note = bitwise_note()
    if note is not None:
        print(note)
    zoo = build_zoo(progress=progress)
    print(f"zoo: {zoo.root}")
    for line in summary_lines(zoo):
        print(f"  {line}")
    print(f"  {compare_with_readme(zoo.accuracy, zoo.config.task.test_size, load_claims())}")
    # configs/demo.toml with the zoo's data directory, next to the zoo it belongs to
    text = (resource_dir("configs") / "demo.toml").read_text()
    config = zoo.root / "demo.toml"
    write_atomic(config, f"data_dir = {json.dumps(str(zoo.data_dir))}\n{text}", if_changed=True)
    root = run_pipeline(config, run_dir=run_dir or "runs/demo", progress=progress)
    run = load_run(root)
    print()
    print(run.table1().to_markdown())
    print(f"\nreport: {run.root.resolve() / RunLayout.REPORT_HTML}")
    return 0
