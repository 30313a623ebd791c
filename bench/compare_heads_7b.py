"""Time and peak memory of `compare` (Table 1's bootstrap) on heads-graph score matrices of
Qwen2.5-7B's shape (813 upstream x 2381 downstream nodes), CPU.

Random float32 scores for n questions per model, 1000 resamples, every metric; each n runs in
its own process so that its peak RSS (ru_maxrss) is its own.

Run: .venv/bin/python bench/compare_heads_7b.py [--n 10 20 40]  (~2 min)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def one(n: int) -> None:
    import numpy as np

    from rl_circuits.analysis.stats import compare

    rng = np.random.default_rng(0)
    before = rng.standard_normal((n, 813, 2381), dtype=np.float32) * 1e-3
    after = rng.standard_normal((n, 813, 2381), dtype=np.float32) * 1e-3
    start = time.perf_counter()
    compare(before, after, n_resamples=1000)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"n = {n}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    for n in args.n:
        subprocess.run([sys.executable, __file__, "--one", str(n)], check=True)


if __name__ == "__main__":
    main()
