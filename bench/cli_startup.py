"""How long the `rl-circuits` command takes when it has nothing to compute.

Two cases, each a fresh process timed from start to exit (wall clock), repeated:
  config_typo    `rl-circuits run BAD.toml`: a config with an unknown key, refused
  finished_run   `rl-circuits run CONFIG` on a finished run: every stage "done"
Neither may import TransformerLens or torch (issue 22: 12 s and 20 s before). The finished run
is configs/tiny.toml's, made once in a temporary directory (about a minute).

Goal: under 2 s each on a quiet 2-core machine.
Run: .venv/bin/python bench/cli_startup.py [--rounds 5]  (~2 min)
Writes bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROBE = (
    "import runpy, sys; sys.argv = ['rl-circuits', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('rl_circuits.cli.main', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    print('heavy:', sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules),"
    " file=sys.stderr)\n    raise\n"
)


def _cli(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(seconds, exit status, stderr) of one `rl-circuits ARGS` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    return time.perf_counter() - start, done.returncode, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "tiny.toml"
        text = (REPO / "configs" / "tiny.toml").read_text()
        config.write_text(text)
        (work / "typo.toml").write_text(text.replace("[select]\n", "[select]\ncolour = 1\n"))
        seconds, status, err = _cli(["run", str(config)], work)  # tiny models + the run
        if status != 0:
            raise SystemExit(f"the tiny run failed:\n{err}")
        print(f"finished run made in {seconds:.0f} s")
        cases = {
            "config_typo": (["run", "typo.toml"], 2),
            "finished_run": (["run", "tiny.toml"], 0),
        }
        report = {}
        for name, (argv, expected) in cases.items():
            times, heavy = [], set()
            for _ in range(args.rounds):
                seconds, status, err = _cli(argv, work)
                if status != expected:
                    raise SystemExit(f"{name}: exit {status}, expected {expected}:\n{err}")
                times.append(seconds)
                heavy |= set(json.loads(err.rsplit("heavy: ", 1)[1].replace("'", '"')))
            report[name] = {
                "seconds_min": min(times),
                "seconds_median": statistics.median(times),
                "heavy_modules_imported": sorted(heavy),
            }
            print(
                f"{name:13s} min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
                f"imports {', '.join(sorted(heavy)) or 'neither torch nor transformer_lens'}"
            )
    report["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_startup.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
