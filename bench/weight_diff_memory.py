"""Peak extra memory and time of `weight_diff` on random checkpoints of Qwen2.5-7B shapes.

The checkpoints have the real hidden size, heads, MLP width and vocabulary (so the largest
tensors, embedding and lm_head at 152064 x 3584, are those of the 7B model) but only `--layers`
layers: `weight_diff` holds one tensor pair at a time, so its peak is the 7B model's peak, and
its time grows by layer (the report extrapolates to 28 layers). Saved in bfloat16, one tensor per
shard with a `model.safetensors.index.json` (the writer holds one tensor at a time); `after`
differs from `before` in the first fifth of every tensor's rows.

Each graph runs in its own process forked after the imports; the peak-RSS mark is reset
(`/proc/self/clear_refs`) before the call, and the report gives VmHWM minus the RSS before the
call (file pages that safetensors maps while copying a tensor out count in it) and the peak of
RssAnon (anonymous memory alone), sampled every millisecond.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
FULL_LAYERS = 28


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape of a Qwen2 checkpoint with this config."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dh = d // h
    shapes = {"model.embed_tokens.weight": (v, d)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (h * dh, d),
            f"{p}.self_attn.q_proj.bias": (h * dh,),
            f"{p}.self_attn.k_proj.weight": (kv * dh, d),
            f"{p}.self_attn.k_proj.bias": (kv * dh,),
            f"{p}.self_attn.v_proj.weight": (kv * dh, d),
            f"{p}.self_attn.v_proj.bias": (kv * dh,),
            f"{p}.self_attn.o_proj.weight": (d, h * dh),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        }
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (v, d)}


def write_pair(root: Path, config: dict) -> tuple[Path, Path]:
    """`before` and `after` checkpoints, one bfloat16 tensor per shard."""
    from safetensors.torch import save_file

    dirs = root / "before", root / "after"
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, (name, shape) in enumerate(tensor_shapes(config).items()):
        file = f"model-{i:05d}.safetensors"
        weight_map[name] = file
        tensor = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        save_file({name: tensor}, str(dirs[0] / file), {"format": "pt"})
        rows = max(1, shape[0] // 5)
        tensor[:rows] += 0.01
        save_file({name: tensor}, str(dirs[1] / file), {"format": "pt"})
        del tensor
    for path in dirs:
        (path / "config.json").write_text(json.dumps(config))
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return dirs


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure(before: Path, after: Path, graph: str, queue) -> None:
    from rl_circuits.models.weight_diff import weight_diff

    torch.set_num_threads(1)
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.001)

    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    frame = weight_diff(before, after, graph=graph, progress=True)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    queue.put(
        {
            "graph": graph,
            "seconds": seconds,
            "peak_extra_rss": _status("VmHWM") - base_rss,
            "peak_extra_anon": peak_anon[0] - base_anon,
            "fraction_changed": frame.attrs["model"]["fraction_changed"],
            "rows": len(frame),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--graphs", nargs="+", default=["paper", "heads"])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (temporary)")
    parser.add_argument("--out", default="bench/results/weight_diff_memory.json")
    args = parser.parse_args()
    config = {**QWEN25_7B, "num_hidden_layers": args.layers}
    shapes = tensor_shapes(config)
    largest = 2 * max(torch.Size(s).numel() for s in shapes.values()) * 2  # bfloat16 bytes
    root = Path(args.dir or tempfile.mkdtemp(prefix="weight-diff-bench-"))
    for name in ("before", "after"):
        (root / name).mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        before, after = write_pair(root, config)
        print(f"wrote two {args.layers}-layer checkpoints in {time.perf_counter() - start:.0f} s")
        import rl_circuits.models.weight_diff  # noqa: F401  (imported before the fork)

        results = []
        ctx = multiprocessing.get_context("fork")
        for graph in args.graphs:
            queue = ctx.Queue()
            child = ctx.Process(target=_measure, args=(before, after, graph, queue))
            child.start()
            results.append(queue.get())
            child.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    per_layer = sum(torch.Size(s).numel() for n, s in shapes.items() if ".layers.0." in n)
    full = n_params + (FULL_LAYERS - args.layers) * per_layer
    gib = 2**30
    print(f"largest tensor pair (bfloat16): {largest / gib:.2f} GiB; parameters {n_params:,}")
    print("| graph | time | extra RSS peak | extra anonymous peak | 28 layers (extrapolated) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        r["extrapolated_seconds"] = r["seconds"] * full / n_params
        print(
            f"| {r['graph']} | {r['seconds']:.0f} s | {r['peak_extra_rss'] / gib:.2f} GiB "
            f"| {r['peak_extra_anon'] / gib:.2f} GiB | ~{r['extrapolated_seconds'] / 60:.0f} min |"
        )
    report = {
        "layers": args.layers,
        "parameters": n_params,
        "largest_pair_bytes": largest,
        "threads": 1,
        "cpu": os.cpu_count(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
