"""Time of one faithfulness curve (`evaluate_circuit` on a log grid of top-k circuits), CPU.

The random Qwen2-shaped benchmark model of `eap_overhead.py` (4 layers, d_model 256, 8 heads,
2 KV heads), one thread, float32: per graph and length, one `attribute` call ranks the edges,
then one curve is 20 grid circuits plus the empty one (21 forward passes, no backward) on a
batch of 4 sequences. Reported: each curve's minimum time over `--rounds` rounds, the time of
one plain forward pass of the same batch, and their ratio (the ideal is 21).

Run: .venv/bin/python bench/circuit_curve.py [--lengths 256 1024] [--rounds 3]  (~3 min)
Writes bench/results/circuit_curve.json.
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.eap_overhead import build_checkpoint  # noqa: E402

POINTS, BATCH = 20, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--graphs", nargs="+", default=["paper", "heads"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rl_circuits import attribute, load_model
    from rl_circuits.engine.circuits import evaluate_circuit, log_grid, top_k_circuits

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(build_checkpoint(Path(tmp) / "m"), device="cpu", max_seq_len=4096)
        for length in args.lengths:
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(4, model.cfg.d_vocab, (BATCH, length), generator=gen)
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, length // 2 :] = True
            with torch.no_grad():
                forward = min(_timed(model, tokens) for _ in range(args.rounds))
            for graph in args.graphs:
                scores = attribute(model, tokens, mask, graph=graph)
                edge_mask = scores.edge_mask.numpy()
                ks = log_grid(int(edge_mask.sum()), POINTS)
                ranked = top_k_circuits(scores.values.abs().mean(0).numpy(), edge_mask, ks)
                circuits = torch.cat(
                    [torch.zeros((1, *edge_mask.shape), dtype=torch.bool), torch.from_numpy(ranked)]
                )
                seconds = min(
                    _timed(evaluate_circuit, model, tokens, mask, circuits, graph)
                    for _ in range(args.rounds)
                )
                row = {
                    "graph": graph,
                    "tokens": length,
                    "batch": BATCH,
                    "circuits": len(circuits),
                    "curve_s": round(seconds, 3),
                    "forward_s": round(forward, 4),
                    "ratio": round(seconds / forward, 1),
                }
                rows.append(row)
                print(row, flush=True)
    out = ROOT / "bench" / "results" / "circuit_curve.json"
    info = {"machine": platform.processor() or platform.machine(), "threads": 1}
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
