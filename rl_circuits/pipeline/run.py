"""Running stages in one process: a config, its run directory, and the stages still to do.

Why: the CLI (`rl-circuits run` and one command per stage) and the demo run stages the same
way: open the run under the config (a forced config change deletes what it made stale),
redo stale prerequisites first, skip what is done, and say which cells ended without results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rl_circuits.errors import StoreError
from rl_circuits.pipeline.registry import STAGE_NAMES, get_stage
from rl_circuits.store.layout import RunLayout


def run_pipeline(
    config: str | os.PathLike[str],
    *,
    stage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Run every stage of `config` that is not done (`stage`: that one, after any stale
    prerequisite; a prerequisite never run is refused, naming the command that runs it).
    Returns the run directory. `run_dir` overrides the config's; `force` accepts a changed
    config (`rl_circuits.pipeline.integrity.open_run`)."""
    from rl_circuits.config import load_config
    from rl_circuits.pipeline.common import device_of, run_root
    from rl_circuits.pipeline.integrity import iter_missing, open_run, stage_current

    if stage is not None:
        get_stage(stage)
    cfg = load_config(config)
    store, changes = open_run(run_root(cfg, run_dir), cfg, force=force)
    if changes.stages:
        print(f"config or data changed; these stages recompute:\n{changes.describe()}")
    with store:
        if stage is None:
            stages = STAGE_NAMES
        else:
            missing = list(iter_missing(store, stage))
            never = [s for s in missing if s not in changes.stages]
            if never:
                raise StoreError(
                    f"the {stage} stage needs the {', '.join(never)} stage"
                    f"{'s' if len(never) > 1 else ''} of run directory {store.root} first: run "
                    f"`rl-circuits {never[0]} {config}`"
                    + (" (and the next ones)" if len(never) > 1 else "")
                    + f", or `rl-circuits run {config}` for every missing stage"
                )
            for name in missing:  # made stale by this config change: redone first
                print(f"{name}: recomputing (invalidated by the config change)")
            stages = (*missing, stage)
        for name in stages:
            if stage is None and stage_current(store, name):
                print(f"{name}: done")
                continue
            device_of(cfg)  # an unusable device fails before any stage runs (imports torch)
            get_stage(name).run(cfg, store, progress=progress)
            print(f"{name}: done")
        if "analyze" in stages:
            _warn_empty_cells(store)
    print(f"run directory: {store.root}")
    return store.root


def _warn_empty_cells(store) -> None:
    """Cells configured but left without results are said at the end, not only in files."""
    skipped = (
        store.read_json(RunLayout.SKIPPED_CELLS) if store.exists(RunLayout.SKIPPED_CELLS) else {}
    )
    if skipped:
        from rl_circuits.analysis.reader import empty_note  # plots: only when there is a note

        print(f"warning: {empty_note(skipped)}", file=sys.stderr)
