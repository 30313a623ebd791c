"""What RelP's rules cost next to plain EAP, on CPU.

The model and the measurement are eap_overhead.py's (as patch_overhead.py): a Qwen2-shaped
random model (4 layers, d_model 256, 8 heads, 2 key/value heads, gated SiLU MLP, RMSNorm), one
sample, one thread; each (method, length) point's extra peak RSS measured in a fresh forked
process after the model is loaded, times from interleaved rounds (min per method): wall time,
and the process's CPU time, which other load on a shared machine disturbs far less.

Methods (paper graph, zero ablation, efficient attention, the defaults):
  eap    attribute(model, tokens, mask)
  relp   attribute(model, tokens, mask, method="relp")  (all four rules)

Goal (issue 25): relp <= 1.3x the time and <= 1.3x the extra memory of eap.
Run: .venv/bin/python bench/relp_overhead.py [--lengths 1024 2048]  (~2 min)
Writes bench/results/relp_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eap_overhead as base  # noqa: E402

RESULTS = base.RESULTS
METHODS = ("eap", "relp")


def _load(method: str, ckpt: Path, max_seq_len: int):
    """The model and one call of `method` (a closure of tokens and mask)."""
    from rl_circuits.engine.attribution import attribute
    from rl_circuits.models.loading import load_model

    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model = load_model(ckpt, dtype=torch.float32, device="cpu", max_seq_len=max_seq_len)

    def run(tokens, mask):
        attribute(model, tokens, mask, method=method)

    return run, model.cfg.d_vocab


def worker(method: str, ckpt: Path, length: int, max_seq_len: int) -> dict:
    """Load, then the extra peak memory and time of one call."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run, vocab = _load(method, ckpt, max_seq_len)
    tokens, mask = base._inputs(length, vocab)
    resettable = base._reset_peak()
    start_rss = base._rss_mb()
    if not resettable:
        start_rss = max(start_rss, base._peak_mb(False))
    start = time.perf_counter()
    run(tokens, mask)
    first = time.perf_counter() - start
    return dict(
        method=method,
        length=length,
        first_call_s=first,
        peak_mb=base._peak_mb(resettable) - start_rss,
    )


def timing_worker(ckpt: Path, length: int, rounds: int, max_seq_len: int) -> dict:
    """Both methods in one process, in turn, `rounds` times after a warm-up round."""
    torch.set_num_threads(1)
    runs = {}
    for method in METHODS:
        runs[method], vocab = _load(method, ckpt, max_seq_len)
    tokens, mask = base._inputs(length, vocab)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds + 1):
        for method in METHODS:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[method](tokens, mask)
            times[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)
    return {
        m: dict(time_s=min(t[1:]), times_s=t[1:], cpu_s=min(cpu[m][1:]), cpu_times_s=cpu[m][1:])
        for m, t in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 5 at 1024, 3 above)")
    parser.add_argument("--out", type=Path, default=RESULTS / "relp_overhead.json")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base.preload()
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = base.build_checkpoint(Path(tmp) / "model")
        for length in args.lengths:
            for method in METHODS:
                rows[method, length] = base.in_fork(worker, method, ckpt, length, args.max_seq_len)
            rounds = args.rounds or base.rounds_for(length)
            timed = base.in_fork(
                timing_worker, ckpt, length, rounds, args.max_seq_len, timeout=1800
            )
            for method in METHODS:
                rows[method, length].update(timed.get(method, {"error": timed.get("error")}))
    base.write_pair_report(rows, list(METHODS), args.lengths, "relp", "eap", args.out)


if __name__ == "__main__":
    main()
