"""Analytic GPU memory of attribute(graph="heads", checkpoint=True) on Qwen2.5-7B at 4096 tokens.

No GPU was lent to the task that added the heads graph, so its 7B memory is estimated, not
measured: from the model's real configuration (through `rl_circuits.models.loading.hooked_config`,
as a checkpoint's config.json would be read), the heads engine's own buffer sizes
(`rl_circuits.engine.heads.buffer_bytes`, which a test checks against what the engine
allocates), and
the paper graph's peak measured on an H200 (bench/README.md, `gpu_7b.py`, eap_ckpt at 4096
tokens: 11.9 GiB above the weights). The heads call runs the same forward, checkpointing and
backward as the paper call; it differs by its engine buffers, its transients, and keys and
values ungrouped (one per query head) in the one block recomputed at a time.

  estimate = weights + (paper measured extra - paper engine buffer)
             + heads engine buffers + heads transients + ungrouped k/v of one block

Run: python bench/heads_memory_7b.py [--length 4096] [--model qwen2.5-7b]  (seconds, CPU)
Writes bench/results/heads_memory_7b.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from gpu_7b import CONFIGS  # noqa: E402

from rl_circuits.engine.heads import buffer_bytes  # noqa: E402
from rl_circuits.models.checkpoints import Checkpoint  # noqa: E402
from rl_circuits.models.loading import hooked_config, model_map_for  # noqa: E402

GIB = 2**30
# attribute(graph="paper", checkpoint=True) extra peak above the weights, H200, bfloat16
# (bench/README.md, gpu_7b.py): model -> {length: GiB}
PAPER_MEASURED_GIB = {"qwen2.5-7b": {4096: 11.9, 8192: 22.8}, "mistral-7b": {4096: 6.8, 8192: 13.5}}


def parameter_count(cfg) -> int:
    """Parameters of the HookedTransformer built from `cfg` (grouped keys/values)."""
    d, d_mlp, vocab = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    width = cfg.n_heads * cfg.d_head
    kv = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    attn = d * width + width + 2 * (d * kv + kv) + width * d + d
    mlp = (3 if cfg.gated_mlp else 2) * d * d_mlp + d_mlp + d
    per_layer = attn + mlp + 2 * d
    return vocab * d + cfg.n_layers * per_layer + d + d * vocab + vocab


def estimate(name: str, length: int) -> dict:
    config = CONFIGS[name]
    ckpt = Checkpoint(path=Path(f"random-{name}"), config=dict(config))
    cfg = hooked_config(
        ckpt, model_map_for(ckpt), dtype=torch.bfloat16, device="cpu", max_seq_len=length
    )
    model_bytes = torch.empty((), dtype=cfg.dtype).element_size()
    weights = parameter_count(cfg) * model_bytes
    paper_buffer = (2 * cfg.n_layers + 1) * length * cfg.d_model * 4  # float32 [2L+1, pos, d]
    paper_extra = PAPER_MEASURED_GIB[name][length] * GIB
    heads = buffer_bytes(cfg, 1, length, torch.float32)
    kv = cfg.n_key_value_heads or cfg.n_heads
    # keys and values per query head inside the recomputed block: k, rotated k, v, and the
    # gradients of each, in the model's dtype
    ungrouped = 6 * length * (cfg.n_heads - kv) * cfg.d_head * model_bytes
    parts = {
        "weights (bfloat16)": weights,
        "paper call's activations, logits, recompute (measured extra - its buffer)": paper_extra
        - paper_buffer,
        **{f"heads buffer: {k}": v for k, v in heads["buffers"].items()},
        **{f"heads transient: {k}": v for k, v in heads["transients"].items()},
        "keys/values per query head in the recomputed block": ungrouped,
    }
    total = sum(parts.values())
    heads_extra = total - weights
    return dict(
        model=name,
        length=length,
        config=dict(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_key_value_heads=kv,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            d_mlp=cfg.d_mlp,
            d_vocab=cfg.d_vocab,
        ),
        parts_gib={k: v / GIB for k, v in parts.items()},
        paper_extra_gib=paper_extra / GIB,
        heads_extra_gib=heads_extra / GIB,
        heads_over_paper_extra=heads_extra / paper_extra,
        total_gib=total / GIB,
        fits_80gb=total < 80e9,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-7b", choices=sorted(PAPER_MEASURED_GIB))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/heads_memory_7b.json")
    args = parser.parse_args(argv)
    if args.length not in PAPER_MEASURED_GIB[args.model]:
        raise SystemExit(
            f"no measured paper-graph peak for {args.model} at {args.length} tokens; "
            f"choose --length from {sorted(PAPER_MEASURED_GIB[args.model])}"
        )
    result = estimate(args.model, args.length)
    print(f"{result['model']} at {result['length']} tokens, graph='heads', checkpoint=True")
    for key, value in result["parts_gib"].items():
        print(f"  {value:8.2f} GiB  {key}")
    print(
        f"  total {result['total_gib']:.1f} GiB ({result['total_gib'] * GIB / 1e9:.1f} GB); "
        f"extra above weights {result['heads_extra_gib']:.1f} GiB = "
        f"{result['heads_over_paper_extra']:.2f}x the paper graph's "
        f"{result['paper_extra_gib']:.1f} GiB; fits in 80 GB: {result['fits_80gb']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
