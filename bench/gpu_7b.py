"""Edge attribution on 7B-shaped models on one GPU: peak CUDA memory and time vs length.

Randomly initialised models with the real Qwen2.5-7B and Mistral-7B (v0.1, sliding window 4096)
configurations in bfloat16, built through the package's own loading path
(`rl_circuits.models.loading.hooked_config` from a config dict; no download, no weights on disk),
weights drawn on the GPU. For 1k, 2k, 4k and 8k tokens (one sample) it measures:

  fwd_bwd_tl  plain HookedTransformer forward+backward, TransformerLens attention
  fwd_bwd     the same with efficient (fused SDPA) attention: the floor for attribution
  eap_tl      attribute(graph="paper", efficient_attention=False)
  eap         attribute(graph="paper")                     (efficient attention, the default)
  eap_ckpt    attribute(graph="paper", checkpoint=True)     (blocks recomputed in backward)
  heads_ckpt  attribute(graph="heads", checkpoint=True)     (every head a node)

Peak memory is torch.cuda.max_memory_allocated during the call minus the memory allocated
before it (the weights); time is the minimum of the timed calls after one warm-up.
Out-of-memory is reported as such. Parameters are frozen; gradients flow from an input
embedding that requires grad.

Run on a GPU machine: python bench/gpu_7b.py          (under 8 minutes on an H100/H200)
Check it anywhere:    python bench/gpu_7b.py --smoke  (tiny models, CPU)
Prints a table; writes gpu_7b.json to $OUT if set, else to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402

from rl_circuits.engine.attribution import attribute, masked_nll  # noqa: E402
from rl_circuits.engine.efficient import efficient_attention  # noqa: E402
from rl_circuits.models.checkpoints import Checkpoint  # noqa: E402
from rl_circuits.models.loading import hooked_config, model_map_for  # noqa: E402

CONFIGS = {
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=28,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        sliding_window=4096,
        tie_word_embeddings=False,
    ),
}
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
METHODS = ("fwd_bwd_tl", "fwd_bwd", "eap_tl", "eap", "eap_ckpt", "heads_ckpt")


def random_model(
    name: str,
    *,
    device: str,
    dtype: torch.dtype,
    max_seq_len: int,
    smoke: bool,
    seed: int = 0,
    **overrides,
) -> HookedTransformer:
    """A HookedTransformer with `name`'s real config (or a tiny one) and random weights.

    The config goes through `hooked_config` exactly as a checkpoint's config.json would, so the
    model has what loading gives a real 7B (GQA, qkv biases, sliding-window layers).
    """
    config = dict(CONFIGS[name])
    if smoke:
        config.update(SMOKE)
        if "sliding_window" in config and config["architectures"][0] == "MistralForCausalLM":
            config["sliding_window"] = max_seq_len // 2  # still exercise the windowed path
    config.update(overrides)
    ckpt = Checkpoint(path=Path(f"random-{name}"), config=config)
    model_map = model_map_for(ckpt)
    cfg = hooked_config(ckpt, model_map, dtype=dtype, device=device, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = HookedTransformer(cfg, move_to_device=False)  # init_weights=False: empty
    with torch.no_grad():
        for pname, param in model.named_parameters():
            last = pname.rsplit(".", 1)[-1]
            if last == "w":  # RMSNorm scales
                param.fill_(1.0)
            elif last in ("b_Q", "_b_K", "_b_V") and model_map.qkv_bias:
                param.normal_(0.0, 0.02)
            elif last.lstrip("_").startswith("b_"):  # biases these families do not have
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    model.eval()
    model.requires_grad_(False)
    return model


def _embed_leaf(act, hook):
    return act.detach().requires_grad_(True)


def _call(model: HookedTransformer, method: str, tokens, mask) -> None:
    if method in ("fwd_bwd_tl", "fwd_bwd"):
        ctx = efficient_attention(model) if method == "fwd_bwd" else nullcontext()
        with ctx:
            logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", _embed_leaf)])
            loss = masked_nll(logits, tokens, mask).sum()
            del logits
            loss.backward()
    else:
        attribute(
            model,
            tokens,
            mask,
            graph="heads" if method == "heads_ckpt" else "paper",
            efficient_attention=method != "eap_tl",
            checkpoint=method in ("eap_ckpt", "heads_ckpt"),
        )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure(model, method: str, length: int, device: str, repeats: int) -> dict:
    """Peak extra memory of the warm-up call, min time of `repeats` more; OOM caught."""
    gen = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), generator=gen).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    cuda = device.startswith("cuda")
    _free(device)
    row: dict = dict(method=method, length=length)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        _call(model, method, tokens, mask)
        _sync(device)
        first = time.perf_counter() - start
        if cuda:
            row["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
            row["weights_gib"] = before / 2**30
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _call(model, method, tokens, mask)
            _sync(device)
            times.append(time.perf_counter() - start)
        row["time_s"] = min(times) if times else first
        row["first_s"] = first
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        _free(device)
    return row


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def selfcheck(device: str, length: int = 256) -> list[dict]:
    """Efficient vs TransformerLens attention on tiny float32 models on this device.

    Max relative differences of logits and edge scores (and of scores with checkpointing),
    with Mistral's window at half the length so the windowed kernel path runs.
    """
    found = []
    for name in CONFIGS:
        model = random_model(
            name, device=device, dtype=torch.float32, max_seq_len=length, smoke=True, seed=1
        )
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.cfg.d_vocab, (2, length), generator=gen).to(device)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, : length // 2] = False
        with torch.no_grad():
            ref = model(tokens)
            with efficient_attention(model):
                got = model(tokens)
        plain = attribute(model, tokens, mask, efficient_attention=False).values
        fused = attribute(model, tokens, mask).values
        ckpt = attribute(model, tokens, mask, checkpoint=True).values
        found.append(
            dict(
                model=name,
                dtype="float32",
                length=length,
                window=model.cfg.window_size,
                logits_rel=_rel(got, ref),
                scores_rel=_rel(fused, plain),
                checkpoint_rel=_rel(ckpt, fused),
            )
        )
        print(f"selfcheck {found[-1]}", flush=True)
    return found


def precision_check(device: str, smoke: bool, length: int = 1024) -> list[dict]:
    """Which bfloat16 path is closer to float32: TransformerLens attention or the fused one?

    Real widths (tiny ones with --smoke), 2 layers, Mistral's window at half the length; the
    same weights in float32 (reference: TransformerLens attention) and in bfloat16.
    """
    found = []
    for name in CONFIGS:
        overrides = dict(num_hidden_layers=2)
        if name.startswith("mistral"):
            overrides["sliding_window"] = length // 2
        kw = dict(device=device, max_seq_len=length, smoke=smoke, seed=2, **overrides)
        m32 = random_model(name, dtype=torch.float32, **kw)
        m16 = random_model(name, dtype=torch.bfloat16, **kw)
        with torch.no_grad():
            for p16, p32 in zip(m16.parameters(), m32.parameters(), strict=True):
                p16.copy_(p32)
        gen = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, m32.cfg.d_vocab, (1, length), generator=gen).to(device)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
        ref = attribute(m32, tokens, mask, efficient_attention=False).values.flatten()
        row = dict(model=name, layers=2, length=length, window=m32.cfg.window_size)
        runs = {
            "fused_fp32": (m32, True),
            "tl_bf16": (m16, False),
            "fused_bf16": (m16, True),
        }
        for key, (model, fused) in runs.items():
            got = attribute(model, tokens, mask, efficient_attention=fused).values.flatten()
            corr = torch.corrcoef(torch.stack([ref, got]))[0, 1]
            row[key] = dict(rel=_rel(got, ref), pearson=float(corr))
        found.append(row)
        print(f"precision vs float32 TL attention: {row}", flush=True)
        del m32, m16
        _free(device)
    return found


def agreement(model: HookedTransformer, length: int, device: str) -> dict:
    """bfloat16 scores of the efficient path vs TransformerLens attention on the 7B model."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, length), generator=gen).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    try:
        plain = attribute(model, tokens, mask, efficient_attention=False).values.flatten()
        fused = attribute(model, tokens, mask).values.flatten()
    except torch.cuda.OutOfMemoryError:
        return dict(length=length, error="OOM")
    finally:
        _free(device)
    corr = torch.corrcoef(torch.stack([plain, fused]))[0, 1]
    return dict(length=length, scores_rel=_rel(fused, plain), pearson=float(corr))


def _table(rows: list[dict], cuda: bool) -> str:
    unit = "GiB extra peak" if cuda else "no memory on CPU"
    lines = [f"time (s) / {unit}; bfloat16, one sample, graph='paper'"]
    lines.append(f"{'model':>11} {'len':>5} " + " ".join(f"{m:>15}" for m in METHODS))
    keyed = {(r["model"], r["length"], r["method"]): r for r in rows}
    for model, length in dict.fromkeys((r["model"], r["length"]) for r in rows):
        cells = []
        for m in METHODS:
            r = keyed.get((model, length, m))
            if r is None:
                cell = "-"
            elif "error" in r:
                cell = r["error"]
            else:
                mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
                cell = f"{r['time_s']:.2f}/{mem}"
            cells.append(f"{cell:>15}")
        lines.append(f"{model:>11} {length:>5} " + " ".join(cells))
    lines.append("")
    lines.append("eap / fwd_bwd (time, memory), efficient attention both:")
    for model, length in dict.fromkeys((r["model"], r["length"]) for r in rows):
        a, b = keyed.get((model, length, "eap")), keyed.get((model, length, "fwd_bwd"))
        if a and b and "time_s" in a and "time_s" in b:
            mem = (
                f"{a['peak_gib'] / b['peak_gib']:.2f}"
                if "peak_gib" in a and "peak_gib" in b and b["peak_gib"] > 0
                else "-"
            )
            lines.append(f"  {model:>11} {length:>5}: {a['time_s'] / b['time_s']:.2f}x, {mem}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what starts later")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        device, lengths = "cpu", args.lengths or [64, 128]
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --smoke to check the script on CPU")
        device, lengths = "cuda", args.lengths or [1024, 2048, 4096, 8192]
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out = out_dir / ("gpu_7b_smoke.json" if args.smoke else "gpu_7b.json")
    info = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        torch=torch.__version__,
        smoke=args.smoke,
        dtype="bfloat16",
    )
    checks = selfcheck(device)
    precision = precision_check(device, args.smoke, length=128 if args.smoke else 1024)
    agree: dict[str, dict] = {}
    rows: list[dict] = []
    skipped_tl_at: dict[str, int] = {}
    for name in args.models:
        model = random_model(
            name, device=device, dtype=torch.bfloat16, max_seq_len=max(lengths), smoke=args.smoke
        )
        print(
            f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
            f"attn_types={model.cfg.attn_types and sorted(set(model.cfg.attn_types))}, "
            f"window={model.cfg.window_size}",
            flush=True,
        )
        for length in lengths:
            for method in args.methods:
                if time.perf_counter() - t0 > args.budget_s:
                    row = dict(method=method, length=length, error="skipped (time budget)")
                elif method.endswith("_tl") and length > skipped_tl_at.get(method, 1 << 30):
                    row = dict(method=method, length=length, error="OOM (shorter OOM'd)")
                else:
                    row = measure(model, method, length, device, args.repeats)
                    if row.get("error") == "OOM":
                        skipped_tl_at[method] = length
                row["model"] = name
                rows.append(row)
                shown = row.get("error") or (
                    f"{row['time_s']:.3f} s"
                    + (f", {row['peak_gib']:.2f} GiB" if "peak_gib" in row else "")
                )
                print(f"  {name} {method:>10} @ {length:>5}: {shown}", flush=True)
                out_dir.mkdir(parents=True, exist_ok=True)
                out.write_text(
                    json.dumps(
                        dict(info, selfcheck=checks, precision=precision, rows=rows), indent=1
                    )
                )
        if time.perf_counter() - t0 < args.budget_s:
            agree[name] = agreement(model, min(lengths), device)
            print(f"  {name} bf16 scores, efficient vs TL attention: {agree[name]}", flush=True)
        skipped_tl_at.clear()
        del model
        _free(device)
    table = _table(rows, device == "cuda")
    print(table)
    report = dict(
        info, selfcheck=checks, precision=precision, agreement=agree, rows=rows, table=table
    )
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
