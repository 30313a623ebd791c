"""What the head-level graph costs next to the paper graph and a plain forward+backward, on CPU.

The model and the method are eap_overhead.py's: a Qwen2-shaped random model (4 layers, d_model
256, 8 heads, 2 key/value heads), one sample, one thread; each (method, length) point's extra
peak RSS measured in a fresh forked process, times from interleaved rounds (min per method).

Methods (all with efficient attention, the default):
  fwd_bwd      plain HookedTransformer forward+backward (loss backward to an input embedding)
  paper        attribute(graph="paper")
  heads        attribute(graph="heads")
  paper_ckpt   attribute(graph="paper", checkpoint=True)
  heads_ckpt   attribute(graph="heads", checkpoint=True)

Goal: heads <= 3x the time and <= 2x the extra memory of paper.
Run: .venv/bin/python bench/heads_overhead.py [--lengths 512 1024 2048]  (~5 min)
Writes bench/results/heads_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
METHODS = ("fwd_bwd", "paper", "heads", "paper_ckpt", "heads_ckpt")


def _load(method: str, ckpt: Path, max_seq_len: int):
    """The model and one call of `method` on it (a closure of tokens and mask)."""
    from rl_circuits.engine.attribution import attribute, masked_nll
    from rl_circuits.engine.efficient import efficient_attention
    from rl_circuits.models.loading import load_model

    model = load_model(ckpt, dtype=torch.float32, device="cpu", max_seq_len=max_seq_len)
    model.requires_grad_(False)
    if method == "fwd_bwd":

        def run(tokens, mask):
            with efficient_attention(model):
                logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", base._embed_leaf)])
                masked_nll(logits, tokens, mask).sum().backward()

    elif method in ("paper", "heads", "paper_ckpt", "heads_ckpt"):
        graph, _, ckpt_flag = method.partition("_")

        def run(tokens, mask):
            attribute(model, tokens, mask, graph=graph, checkpoint=bool(ckpt_flag))

    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
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


def timing_worker(methods: list[str], ckpt: Path, length: int, rounds: int, max_seq_len: int):
    """Every method in one process, in turn, `rounds` times after a warm-up round."""
    torch.set_num_threads(1)
    runs = {}
    for method in methods:
        runs[method], vocab = _load(method, ckpt, max_seq_len)
    tokens, mask = base._inputs(length, vocab)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds + 1):
        for method in methods:
            start = time.perf_counter()
            runs[method](tokens, mask)
            times[method].append(time.perf_counter() - start)
    return {m: dict(time_s=min(t[1:]), times_s=t[1:]) for m, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 7, 5, 3 by length)")
    parser.add_argument("--out", type=Path, default=RESULTS / "heads_overhead.json")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base.preload()
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = base.build_checkpoint(Path(tmp) / "qwen2-bench")
        for length in args.lengths:
            for method in METHODS:
                rows[method, length] = base.in_fork(worker, method, ckpt, length, args.max_seq_len)
            rounds = args.rounds or base.rounds_for(length)
            timed = base.in_fork(
                timing_worker, list(METHODS), ckpt, length, rounds, args.max_seq_len
            )
            for method in METHODS:
                row = rows[method, length]
                if "error" in timed:
                    row.setdefault("error", timed["error"])
                else:
                    row.update(timed[method], rounds=rounds)
                shown = row.get("error") or f"{row['time_s']:.3f} s, {row['peak_mb']:.0f} MB"
                print(f"  {method:>10} @ {length:>5}: {shown}", flush=True)
    report = summarize(rows, args.lengths)
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def summarize(rows: dict, lengths: list[int]) -> dict:
    """The printed table, the heads/paper ratios and whether the goals were met."""
    lines = [
        "time (s, min of interleaved rounds) / extra peak RSS (MB), one sample, CPU, 1 thread",
        f"{'len':>5} " + " ".join(f"{m:>16}" for m in METHODS),
    ]
    for length in lengths:
        cells = [
            f"{base._fmt(rows.get((m, length)), 'time_s', '.3f'):>7}/"
            f"{base._fmt(rows.get((m, length)), 'peak_mb', '.0f'):>7}"
            for m in METHODS
        ]
        lines.append(f"{length:>5} " + " ".join(f"{c:>16}" for c in cells))
    pairs = {
        "heads/paper": ("heads", "paper"),
        "heads_ckpt/paper_ckpt": ("heads_ckpt", "paper_ckpt"),
        "heads/fwd_bwd": ("heads", "fwd_bwd"),
        "paper/fwd_bwd": ("paper", "fwd_bwd"),
    }
    ratios: dict[str, dict[int, dict]] = {}
    lines += ["", "ratios time / memory", f"{'len':>5} " + " ".join(f"{k:>22}" for k in pairs)]
    for length in lengths:
        cells = []
        for name, (a, b) in pairs.items():
            t, mem = (base.ratio(rows, a, b, length, k) for k in ("time_s", "peak_mb"))
            ratios.setdefault(name, {})[length] = {"time": t, "memory": mem}
            cells.append(
                f"{'-' if t is None else f'{t:.2f}'} / {'-' if mem is None else f'{mem:.2f}'}"
            )
        lines.append(f"{length:>5} " + " ".join(f"{c:>22}" for c in cells))
    goals = {}
    for name in ("heads/paper", "heads_ckpt/paper_ckpt"):
        for key, limit in (("time", 3.0), ("memory", 2.0)):
            values = [ratios[name][n][key] for n in lengths]
            ok = None if any(v is None for v in values) else all(v <= limit for v in values)
            goals[f"{name} {key} <= {limit:g}x, every length"] = ok
    lines += ["", "goals"] + [
        f"  {'met' if ok else 'NOT met' if ok is not None else 'n/a':>7}  {name}"
        for name, ok in goals.items()
    ]
    return dict(
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=os.cpu_count(),
            torch=torch.__version__,
            threads=1,
        ),
        model=dict(architecture="Qwen2ForCausalLM", **base.MODEL),
        rows=[rows[k] for k in sorted(rows, key=lambda k: (k[1], METHODS.index(k[0])))],
        ratios=ratios,
        goals=goals,
        table="\n".join(lines),
    )


if __name__ == "__main__":
    main()
