"""What edge attribution costs on top of one forward+backward pass, on CPU, vs sequence length.

A Qwen2-shaped random model (4 layers, d_model 256, 8 heads, 2 key/value heads) at 128 to 2048
tokens, one sample, one thread. Each (method, length) runs in a fresh (forked) process: its peak
memory is the peak resident set size during the measurement minus the resident size after the
model was loaded (Linux VmHWM, reset through /proc/self/clear_refs), taken on the first run;
its time comes from one more process per length that calls every method in turn, round after
round (7 rounds up to 512 tokens, 5 at 1024, 3 at 2048, after a warm-up round), and is each
method's minimum: on a shared machine, interleaving spreads the other load over all methods
alike, and the minimum is the least disturbed call.

Methods (all backpropagate the same masked NLL, parameters frozen, from an input embedding
that requires grad):
  tl         plain HookedTransformer forward+backward (TransformerLens attention)
  tl_sdpa    the same inside `efficient_attention(model)`
  eap        attribute(graph="paper", efficient_attention=False)
  eap_sdpa   attribute(graph="paper") (efficient attention, the default)
  eap_ckpt   attribute(graph="paper", checkpoint=True)
  authors    the authors' recipe: TransformerLens `use_split_qkv_input` + `use_hook_mlp_in`,
             per-head backward hooks on hook_{q,k,v}_input / hook_mlp_in, and a
             [batch, pos, n_upstream, d_model] activation buffer filled in the forward
  hf_sdpa    the Hugging Face model (attn_implementation="sdpa") forward+backward: the floor

Run: .venv/bin/python bench/eap_overhead.py [--lengths 128 256 ...] [--rounds N]  (~6 min)
Writes bench/results/eap_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
METHODS = ("tl", "tl_sdpa", "eap", "eap_sdpa", "eap_ckpt", "authors", "hf_sdpa")
MODEL = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def build_checkpoint(path: Path, **overrides) -> Path:
    """A random Qwen2 checkpoint of the benchmark's shape (or `overrides`) at `path`."""
    from rl_circuits.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(path, "Qwen2ForCausalLM", **{**MODEL, **overrides})


# --- one measurement, in its own process ---------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(resettable: bool) -> float:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(length: int, vocab: int):
    gen = torch.Generator().manual_seed(length)
    tokens = torch.randint(4, vocab, (1, length), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return tokens, mask


def _embed_leaf(act, hook):
    return act.detach().requires_grad_(True)


def authors_recipe(model, tokens, mask) -> torch.Tensor:
    """Edge scores [batch, n_upstream, n_downstream] the way the authors' code gets them.

    TransformerLens's per-head input hooks (`use_split_qkv_input`, `use_hook_mlp_in`): forward
    hooks copy each upstream output into a [batch, pos, n_upstream, d_model] buffer, backward
    hooks on each downstream input contract its (per-head) gradient with the buffer prefix.
    """
    from rl_circuits.engine.attribution import masked_nll
    from rl_circuits.engine.graph import build_graph

    graph = build_graph("paper", model.cfg.n_layers)
    batch, pos = tokens.shape
    buf = torch.zeros(batch, pos, len(graph.upstream), model.cfg.d_model)
    scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream))

    def store(u):
        def hook(act, hook):
            buf[:, :, u] = act.detach()
            return _embed_leaf(act, hook) if u == 0 else None

        return hook

    def contract(d, n):
        def hook(grad, hook):
            if grad.ndim == 4:  # one copy of the residual per head
                part = torch.einsum("bpnm,bphm->bn", buf[:, :, :n], grad.float())
            else:
                part = torch.einsum("bpnm,bpm->bn", buf[:, :, :n], grad.float())
            scores[:, :n, d] -= part

        return hook

    fwd = [(name, store(u)) for u, name in enumerate(graph.upstream)]
    sites = zip(graph.downstream, graph.n_before, strict=True)
    bwd = [(name, contract(d, n)) for d, (name, n) in enumerate(sites)]
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            masked_nll(model(tokens), tokens, mask).sum().backward()
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    return scores


def _load(method: str, ckpt: Path, max_seq_len: int):
    """The model and one call of `method` on it (a closure of tokens and mask)."""
    from contextlib import nullcontext

    from rl_circuits.engine.attribution import attribute, masked_nll
    from rl_circuits.engine.efficient import efficient_attention

    if method == "hf_sdpa":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, attn_implementation="sdpa", dtype=torch.float32
        ).eval()
        model.requires_grad_(False)
        vocab = model.config.vocab_size

        def run(tokens, mask):
            embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            masked_nll(logits, tokens, mask).sum().backward()

        return run, vocab

    from rl_circuits.models.loading import load_model

    model = load_model(ckpt, dtype=torch.float32, device="cpu", max_seq_len=max_seq_len)
    model.requires_grad_(False)
    vocab = model.cfg.d_vocab
    if method in ("tl", "tl_sdpa"):
        fused = method == "tl_sdpa"

        def run(tokens, mask):
            with efficient_attention(model) if fused else nullcontext():
                logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", _embed_leaf)])
                masked_nll(logits, tokens, mask).sum().backward()

    elif method in ("eap", "eap_sdpa", "eap_ckpt"):
        options = dict(efficient_attention=method != "eap", checkpoint=method == "eap_ckpt")

        def run(tokens, mask):
            attribute(model, tokens, mask, graph="paper", **options)

    elif method == "authors":

        def run(tokens, mask):
            authors_recipe(model, tokens, mask)

    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return run, vocab


def worker(method: str, ckpt: Path, length: int, repeats: int, max_seq_len: int) -> dict:
    """Load, measure the extra peak memory of one call, then time `repeats` more calls."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run, vocab = _load(method, ckpt, max_seq_len)
    tokens, mask = _inputs(length, vocab)
    resettable = _reset_peak()
    base = _rss_mb()
    if not resettable:
        base = max(base, _peak_mb(False))
    start = time.perf_counter()
    run(tokens, mask)
    first = time.perf_counter() - start
    peak = _peak_mb(resettable) - base
    times = [first]
    for _ in range(repeats):
        start = time.perf_counter()
        run(tokens, mask)
        times.append(time.perf_counter() - start)
    timed = times[1:] or times
    return dict(
        method=method, length=length, time_s=min(timed), times_s=times, peak_mb=peak, base_mb=base
    )


def timing_worker(methods: list[str], ckpt: Path, length: int, rounds: int, max_seq_len: int):
    """Every method in one process, called in turn `rounds` times after a warm-up round.

    Interleaving spreads the other load on a shared machine over all methods alike; the
    minimum of each method's calls is its least disturbed time.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runs = {}
    for method in methods:
        runs[method], vocab = _load(method, ckpt, max_seq_len)
    tokens, mask = _inputs(length, vocab)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds + 1):
        for method in methods:
            start = time.perf_counter()
            runs[method](tokens, mask)
            times[method].append(time.perf_counter() - start)
    return {m: dict(time_s=min(t[1:]), times_s=t[1:]) for m, t in times.items()}


def _child(conn, fn, args):
    try:
        conn.send(fn(*args))
    except BaseException as exc:  # report, never hang the parent
        conn.send(dict(error=f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def preload() -> None:
    """Import what the workers use once, so each forked worker starts in a second, not ten."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import rl_circuits.engine.attribution  # noqa: F401
    import rl_circuits.engine.efficient  # noqa: F401
    import rl_circuits.models.loading  # noqa: F401


def in_fork(fn, *args, timeout: float = 900):
    """`fn(*args)` in a fresh forked process: peaks cannot leak from one measurement to the next.

    Forked (Linux) from a parent that has done the imports; a worker resets the kernel's peak
    RSS mark after it loads its model, so the pages shared with the parent do not count.
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    proc.join(5 if result is not None else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        why = f"timed out after {timeout:.0f} s" if proc.exitcode in (None, -9) else "died"
        result = dict(error=f"{why} (exit {proc.exitcode})")
    return result


def measure(
    method: str, ckpt: Path, length: int, repeats: int, max_seq_len: int, timeout: float = 900
) -> dict:
    """`worker` (peak memory of one call, then timed calls) in a fresh forked process."""
    result = in_fork(worker, method, ckpt, length, repeats, max_seq_len, timeout=timeout)
    return {"method": method, "length": length, **result}


def rounds_for(length: int) -> int:
    """Timed rounds per length: more where calls are short and noise is relatively larger."""
    return 7 if length <= 512 else 5 if length <= 1024 else 3


# --- the table --------------------------------------------------------------------------------


def check_authors_recipe(ckpt: Path) -> float:
    """Relative difference between the authors' recipe and attribute() (must be ~1e-6)."""
    from rl_circuits.engine.attribution import attribute
    from rl_circuits.models.loading import load_model

    model = load_model(ckpt, dtype=torch.float32, device="cpu", max_seq_len=128)
    model.requires_grad_(False)
    tokens, mask = _inputs(64, model.cfg.d_vocab)
    ours = attribute(model, tokens, mask, graph="paper").values
    theirs = authors_recipe(model, tokens, mask)
    return float((ours - theirs).abs().max() / ours.abs().max())


def _fmt(row: dict | None, key: str, spec: str) -> str:
    if row is None or key not in row:
        return "-" if row is None else "err"
    return format(row[key], spec)


def ratio(rows: dict, a: str, b: str, length: int, key: str) -> float | None:
    ra, rb = rows.get((a, length)), rows.get((b, length))
    if not ra or not rb or key not in ra or key not in rb or rb[key] <= 0:
        return None
    return ra[key] / rb[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 7, 5, 3 by length)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eap_overhead.json")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preload()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "qwen2-bench")
        agreement = check_authors_recipe(ckpt)
        print(f"authors' recipe vs attribute(): max relative difference {agreement:.1e}")
        rows: dict[tuple[str, int], dict] = {}
        for length in args.lengths:
            for method in args.methods:  # memory: one fresh process per point
                row = measure(method, ckpt, length, 0, args.max_seq_len)
                rows[method, length] = row
            rounds = args.rounds or rounds_for(length)
            timed = in_fork(timing_worker, args.methods, ckpt, length, rounds, args.max_seq_len)
            for method in args.methods:
                row = rows[method, length]
                row.pop("time_s", None)  # the memory run's single call: not a timing
                row["first_call_s"] = row.pop("times_s", [None])[0]
                if "error" in timed:
                    row.setdefault("error", timed["error"])
                else:
                    row.update(timed[method], rounds=rounds)
                shown = row.get("error") or f"{row['time_s']:.3f} s, {row['peak_mb']:.0f} MB"
                print(f"  {method:>9} @ {length:>5}: {shown}", flush=True)
    report = summarize(rows, args.lengths, args.methods)
    report["authors_recipe_agreement"] = agreement
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def summarize(rows: dict, lengths: list[int], methods: list[str]) -> dict:
    """The printed table, the ratios and which targets were met."""
    lines = [
        "time (s, min of interleaved rounds) / extra peak RSS (MB), one sample, CPU, 1 thread",
        f"{'len':>5} " + " ".join(f"{m:>16}" for m in methods),
    ]
    for length in lengths:
        cells = []
        for m in methods:
            row = rows.get((m, length))
            cells.append(f"{_fmt(row, 'time_s', '.3f'):>7}/{_fmt(row, 'peak_mb', '.0f'):>7}")
            cells[-1] = f"{cells[-1]:>16}"
        lines.append(f"{length:>5} " + " ".join(cells))
    pairs = {
        "eap/tl": ("eap", "tl"),
        "eap_sdpa/tl_sdpa": ("eap_sdpa", "tl_sdpa"),
        "eap/authors": ("eap", "authors"),
        "eap_sdpa/authors": ("eap_sdpa", "authors"),
        "eap_sdpa/hf_sdpa": ("eap_sdpa", "hf_sdpa"),
        "eap_ckpt/hf_sdpa": ("eap_ckpt", "hf_sdpa"),
        "eap_sdpa/eap": ("eap_sdpa", "eap"),
    }
    ratios: dict[str, dict[int, dict[str, float | None]]] = {}
    lines += ["", "ratios time / memory", f"{'len':>5} " + " ".join(f"{k:>17}" for k in pairs)]
    for length in lengths:
        cells = []
        for name, (a, b) in pairs.items():
            t, mem = (ratio(rows, a, b, length, k) for k in ("time_s", "peak_mb"))
            ratios.setdefault(name, {})[length] = {"time": t, "memory": mem}
            ts = "-" if t is None else f"{t:.2f}"
            ms = "-" if mem is None else f"{mem:.2f}"
            cells.append(f"{ts + ' / ' + ms:>17}")
        lines.append(f"{length:>5} " + " ".join(cells))
    targets = _targets(ratios, lengths)
    lines += ["", "targets"] + [
        f"  {'met' if ok else 'NOT met' if ok is not None else 'n/a':>7}  {name}"
        for name, ok in targets.items()
    ]
    return dict(
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=os.cpu_count(),
            torch=torch.__version__,
            threads=1,
        ),
        model=dict(architecture="Qwen2ForCausalLM", **MODEL),
        rows=[rows[k] for k in sorted(rows, key=lambda k: (k[1], methods.index(k[0])))],
        ratios=ratios,
        targets=targets,
        table="\n".join(lines),
    )


def _targets(ratios: dict, lengths: list[int]) -> dict[str, bool | None]:
    def all_le(name: str, key: str, limit: float, at: list[int]) -> bool | None:
        values = [ratios.get(name, {}).get(n, {}).get(key) for n in at]
        if not values or any(v is None for v in values):
            return None
        return all(v <= limit for v in values)

    last = [max(lengths)]
    return {
        "attribute (TL attention) <= 1.3x time of plain TL fwd+bwd, every length": all_le(
            "eap/tl", "time", 1.3, lengths
        ),
        "attribute (TL attention) <= 1.2x memory of plain TL fwd+bwd, every length": all_le(
            "eap/tl", "memory", 1.2, lengths
        ),
        "efficient attribute <= 1.3x time of efficient TL fwd+bwd, every length": all_le(
            "eap_sdpa/tl_sdpa", "time", 1.3, lengths
        ),
        "efficient attribute <= 1.2x memory of efficient TL fwd+bwd, every length": all_le(
            "eap_sdpa/tl_sdpa", "memory", 1.2, lengths
        ),
        "attribute below the authors' recipe (time), every length": all_le(
            "eap/authors", "time", 1.0, lengths
        ),
        "attribute below the authors' recipe (memory), every length": all_le(
            "eap/authors", "memory", 1.0, lengths
        ),
        f"efficient attribute <= 1.5x HF SDPA time at {last[0]}": all_le(
            "eap_sdpa/hf_sdpa", "time", 1.5, last
        ),
        f"efficient attribute <= 1.5x HF SDPA memory at {last[0]}": all_le(
            "eap_sdpa/hf_sdpa", "memory", 1.5, last
        ),
    }


def write_pair_report(
    rows: dict, methods: list[str], lengths: list[int], new: str, old: str, out: Path
) -> None:
    """Print and write (JSON at `out`) the CPU time and extra peak memory of each method per
    length, with `new` / `old` ratios: the report of patch_overhead.py and relp_overhead.py."""
    nan = float("nan")
    lines = [f"{'len':>5} " + " ".join(f"{m:>20}" for m in methods) + f"   {new}/{old}"]
    lines.append("(CPU s, extra peak MB)")
    for length in lengths:
        cells = []
        for m in methods:
            time_s, peak = rows[m, length].get("cpu_s", nan), rows[m, length].get("peak_mb", nan)
            cells.append(f"{time_s:7.3f} s {peak:7.1f} MB")
        o, n = rows[old, length], rows[new, length]
        ratios = (
            f"cpu {n['cpu_s'] / o['cpu_s']:.2f}x, wall {n['time_s'] / o['time_s']:.2f}x, "
            f"memory {n['peak_mb'] / o['peak_mb']:.2f}x"
            if "cpu_s" in n and "cpu_s" in o
            else "-"
        )
        lines.append(f"{length:>5} " + " ".join(f"{c:>20}" for c in cells) + f"   {ratios}")
    table = "\n".join(lines)
    print(table)
    report = dict(
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        model=MODEL,
        rows=[rows[m, n] for n in lengths for m in methods],
        table=table,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
