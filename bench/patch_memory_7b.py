"""Analytic GPU memory of cross-model patching on 7B models in bfloat16, from measured parts.

`attribute(before, tokens, mask, ablation="patch", corrupted_model=after)` holds both models'
weights, then runs the after model forward without gradients (its transients are freed before
the clean pass) writing -O'_u into the one output buffer, then the zero-ablation attribution's
forward and backward, the buffer now holding O_u - O'_u. So its peak is the peak of
zero-ablation attribution plus the second model's weights. This script adds those up from
`bench/results/gpu_7b.json` (extra peak of `eap` / `eap_ckpt` above the weights, and the
weights, measured on an H200) and checks the totals against one 80 GB GPU (74.5 GiB).
The output buffer itself ([1 + 2L, pos, d_model] float32) is part of the measured peak; the
script prints it too.

Run: .venv/bin/python bench/patch_memory_7b.py   (seconds; no GPU needed)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GPU_GIB = 80e9 / 2**30  # an "80 GB" card
SHAPES = {"qwen2.5-7b": (28, 3584), "mistral-7b": (32, 4096)}  # n_layers, d_model


def main() -> None:
    rows = json.loads((RESULTS / "gpu_7b.json").read_text())["rows"]
    measured = {(r["model"], r["method"], r["length"]): r for r in rows if "peak_gib" in r}
    print(f"{'model':>11} {'len':>5} {'buffer':>7} {'weights x2':>10} {'eap':>13} {'eap_ckpt':>13}")
    for model, (n_layers, d_model) in SHAPES.items():
        for length in (1024, 2048, 4096, 8192):
            cells = []
            for method in ("eap", "eap_ckpt"):
                row = measured.get((model, method, length))
                if row is None:
                    cells.append("-")
                    continue
                total = 2 * row["weights_gib"] + row["peak_gib"]
                fits = "fits" if total <= GPU_GIB else "OOM"
                cells.append(f"{total:5.1f} {fits}")
            weights = measured[(model, "eap", 1024)]["weights_gib"]
            buffer = (1 + 2 * n_layers) * length * d_model * 4 / 2**30
            print(
                f"{model:>11} {length:>5} {buffer:7.2f} {2 * weights:10.1f} "
                f"{cells[0]:>13} {cells[1]:>13}"
            )
    print(f"GiB; one 80 GB GPU holds {GPU_GIB:.1f} GiB")


if __name__ == "__main__":
    main()
