"""How the peak memory of `attribute` grows with sequence length: plain vs efficient attention.

A small random Qwen2-shaped model (2 layers, d_model 128, 4 heads, 2 key/value heads) on CPU,
one sample, one thread, `attribute(graph="paper")` at 256 to 8192 tokens. Each point runs in
a fresh forked process (see eap_overhead.py): extra peak RSS over the loaded model, and the
time of that one call. The exponent k of memory ~ length^k is the slope of a least-squares
line through (log length, log memory), over the lengths >= 1024 (where fixed costs no longer
dominate) and over all lengths. TransformerLens attention keeps [heads, pos, pos] scores and
patterns per layer (k -> 2); the efficient path keeps nothing quadratic (k -> 1).

The plain path needs about 7 GB and half a minute at 8192 tokens; `--plain-max 4096` stops it
earlier on smaller machines.

Run: .venv/bin/python bench/memory_scaling.py  (about 4 minutes). Writes
bench/results/memory_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eap_overhead as common  # noqa: E402  (the measurement machinery)
import torch  # noqa: E402

SMALL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
)
PATHS = {"plain": "eap", "efficient": "eap_sdpa"}


def slope(lengths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(length)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values, strict=True) if v > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--plain-max", type=int, default=8192, help="longest plain-path length")
    parser.add_argument("--fit-from", type=int, default=1024, help="shortest length in the fit")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "memory_scaling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    common.preload()
    max_len = max(args.lengths)
    rows: dict[str, dict[int, dict]] = {path: {} for path in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = common.build_checkpoint(Path(tmp) / "qwen2-small", **SMALL)
        for length in args.lengths:
            for path, method in PATHS.items():
                if path == "plain" and length > args.plain_max:
                    continue
                row = common.measure(method, ckpt, length, repeats=0, max_seq_len=max_len)
                rows[path][length] = row
                shown = row.get("error") or f"{row['time_s']:.2f} s, {row['peak_mb']:.0f} MB"
                print(f"  {path:>9} @ {length:>5}: {shown}", flush=True)

    fits = {}
    for path in PATHS:
        ok = {n: r for n, r in rows[path].items() if "peak_mb" in r}
        tail = [n for n in sorted(ok) if n >= args.fit_from]
        fits[path] = {
            f"from_{args.fit_from}": slope(tail, [ok[n]["peak_mb"] for n in tail]),
            "all": slope(sorted(ok), [ok[n]["peak_mb"] for n in sorted(ok)]),
        }
    lines = [
        "attribute(graph='paper'), extra peak RSS (MB) / time of one call (s), CPU, 1 thread",
        f"{'len':>6} {'plain':>16} {'efficient':>16} {'plain/efficient':>16}",
    ]
    for length in args.lengths:
        cells = []
        for path in PATHS:
            r = rows[path].get(length)
            if r is None:
                cells.append(f"{'-':>16}")
            elif "error" in r:
                cells.append(f"{'error':>16}")
            else:
                cells.append(f"{r['peak_mb']:>8.0f} /{r['time_s']:>6.2f}")
        p, e = rows["plain"].get(length, {}), rows["efficient"].get(length, {})
        rel = f"{p['peak_mb'] / e['peak_mb']:.1f}x" if "peak_mb" in p and "peak_mb" in e else "-"
        lines.append(f"{length:>6} {cells[0]:>16} {cells[1]:>16} {rel:>16}")
    lines.append("")
    for path in PATHS:
        parts = ", ".join(
            f"{k.replace('_', ' ')}: {'-' if v is None else f'{v:.2f}'}"
            for k, v in fits[path].items()
        )
        lines.append(f"exponent of memory vs length, {path}: {parts}")
    target = fits["efficient"][f"from_{args.fit_from}"]
    met = target is not None and target < 1.2
    lines.append(f"target: efficient exponent < 1.2 -> {'met' if met else 'NOT met'}")
    table = "\n".join(lines)
    print(table)
    report = dict(
        model=dict(architecture="Qwen2ForCausalLM", **SMALL),
        torch=torch.__version__,
        rows={path: [rows[path][n] for n in sorted(rows[path])] for path in PATHS},
        exponents=fits,
        plain_max=args.plain_max,
        target_met=met,
        table=table,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
