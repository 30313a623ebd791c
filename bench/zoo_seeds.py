"""Is the zoo's post-training gain a property of the recipe or of one seed (issue 28)?

Builds the zoo recipe (`ZooConfig()`, or `--config TOML`) with `--seeds N` seed sets
(default 5; set k adds k to the init, SFT, GRPO and DPO seeds, so set 0 is the demo's; the
data seed stays, so every run answers the same test questions), each in the build's pinned
numeric environment, and with `--kernels` once more under each kernel set this CPU has
(`default`, `avx2`, `avx512`) at seed set 0. Reports per run the greedy test accuracy of
SFT / GRPO / DPO and each child's gain and McNemar exact p against its SFT parent (the
numbers `build_zoo` stores in `zoo.json`), then the recipe's criteria: SFT's spread, and how
many seed sets give GRPO / DPO at least +5 points.

    .venv/bin/python bench/zoo_seeds.py [--seeds 5] [--kernels] [--config TOML] [--out DIR]

A full-recipe run is 4-8 minutes a zoo on one thread (15 with the `default` kernels).
Zoos go to `--out` (default `<home>/zoo-seeds/`; finished ones are reused); the report to
`bench/results/zoo_seeds.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tomllib
from pathlib import Path

from rl_circuits.models.pairs import home_dir
from rl_circuits.zoo import ZooConfig, build_zoo
from rl_circuits.zoo.build import RECIPES
from rl_circuits.zoo.numerics import kernel_sets

RESULTS = Path(
    os.environ.get("ZOO_SEEDS_RESULTS", Path(__file__).parent / "results" / "zoo_seeds.json")
)
GAIN = 0.05  # the bar: +5 points over SFT


def seeded(config: ZooConfig, k: int) -> ZooConfig:
    """Seed set `k` of `config`: every training seed shifted by k, the data seed kept."""
    return dataclasses.replace(
        config,
        init_seed=config.init_seed + k,
        sft=dataclasses.replace(config.sft, seed=config.sft.seed + k),
        grpo=dataclasses.replace(config.grpo, seed=config.grpo.seed + k),
        dpo=dataclasses.replace(config.dpo, seed=config.dpo.seed + k),
    )


def measure(config: ZooConfig, root: Path, kernels: str | None) -> dict:
    """Build (or reuse) one zoo; its accuracies and paired tests."""
    zoo = build_zoo(config, root=root, progress=False, kernels=kernels, register=False)
    row = {f"{recipe}_test": zoo.accuracy[recipe] for recipe in RECIPES}
    for recipe in RECIPES[1:]:
        row[f"{recipe}_gain"] = zoo.paired[recipe]["gain"]
        row[f"{recipe}_p"] = zoo.paired[recipe]["p_value"]
    return row


def criteria(rows: list[dict]) -> dict:
    """The issue's bars over the seed runs: SFT spread, GRPO/DPO runs at +5 points, mean gain."""
    sft = [row["sft_test"] for row in rows]
    out = {"sft_spread_points": round(100 * (max(sft) - min(sft)), 1)}
    for recipe in RECIPES[1:]:
        gains = [row[f"{recipe}_gain"] for row in rows]
        out[f"{recipe}_runs_at_plus5"] = f"{sum(g >= GAIN - 1e-9 for g in gains)}/{len(gains)}"
        out[f"{recipe}_mean_gain_points"] = round(100 * statistics.mean(gains), 1)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| run | SFT test | GRPO test | GRPO vs SFT | DPO test | DPO vs SFT |",
        "| --- | ---: | ---: | --- | ---: | --- |",
    ]
    for row in rows:
        cells = [row["run"], f"{row['sft_test']:.1%}"]
        for recipe in RECIPES[1:]:
            cells.append(f"{row[f'{recipe}_test']:.1%}")
            cells.append(f"{100 * row[f'{recipe}_gain']:+.1f} (p = {row[f'{recipe}_p']:.2g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seed sets (default 5)")
    parser.add_argument("--kernels", action="store_true", help="also each kernel set, seed 0")
    parser.add_argument("--config", type=Path, help="TOML overriding ZooConfig fields ([zoo])")
    parser.add_argument("--out", type=Path, help="zoo folders (default <home>/zoo-seeds)")
    args = parser.parse_args()
    config = ZooConfig()
    if args.config is not None:
        config = ZooConfig.from_dict(tomllib.loads(args.config.read_text()).get("zoo", {}))
    out = args.out or home_dir() / "zoo-seeds"
    plan = [(f"seed set {k} (pinned)", seeded(config, k), None) for k in range(args.seeds)]
    if args.kernels:
        plan += [(f"seed set 0, {k} kernels", config, k) for k in kernel_sets()]
    rows = []
    for name, run_config, kernels in plan:
        folder = out / f"{run_config.digest()}-{kernels or 'pinned'}"
        print(f"{name}: {folder}", flush=True)
        rows.append({"run": name, "kernels": kernels, **measure(run_config, folder, kernels)})
    seeds = [row for row in rows if row["kernels"] is None]
    report = {"config": config.to_dict(), "runs": rows, "criteria": criteria(seeds)}
    print(table(rows))
    print(json.dumps(report["criteria"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
