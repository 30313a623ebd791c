"""What post-training did to the weights: per graph node, how many parameters changed and how.

`weight_diff` streams two checkpoints of one model (safetensors, one tensor pair in memory at a
time), maps each tensor through `model_maps/` to the graph node that owns it and returns, per
node: `n_params`, `n_changed` (|a - b| > tol after casting both to `dtype`, as Mukherjee et al.
2025 count updated parameters in bfloat16), `fraction_changed`, `rel_norm` = ||dW|| / ||W||
(Frobenius, from the saved values) and `effective_rank` of the update (Roy & Vetterli 2007).

Owners: the embedding (`hook_embed`), each attention layer (`blocks.l.hook_attn_out`) or, in
the `heads` graph, each head (`blocks.l.attn.hook_result[h]`: its rows of W_Q and columns of
W_O, and the W_K / W_V rows of the key-value head it reads, so under grouped-query attention a
key-value head counts in each of its query heads' rows), each MLP (`blocks.l.hook_mlp_out`), and
rows that are no graph node: the norms (`blocks.l.ln1`, `blocks.l.ln2`, `ln_final`), `unembed`
(absent with tied embeddings: the shared matrix is the embedding's) and, in the `heads` graph,
an attention output bias (`blocks.l.attn.b_O`). Whole-model totals, each parameter counted
once, are in `DataFrame.attrs["model"]`.

Effective rank: every matrix of these families has one side on the residual stream (d_model),
so a node's update is its matrices stacked as rows of one [N, d_model] matrix (W_O and the MLP's
down projection transposed, a norm's weight one row; biases left out), and its effective rank
is exp(entropy of its normalised singular values, float32 SVD), between 1 and d_model (0: no
update). Where N > `rank_rows`, `rank_rows` rows drawn uniformly without replacement (seeded)
stand for it: (N / rank_rows) X^T X of the sample is an unbiased estimate of dW^T dW.

Memory: one tensor pair as saved, float64 temporaries of `CHUNK` elements, and the sampled
rows of the nodes in progress (float32, at most `rank_rows` x d_model per node); see
bench/weight_diff_memory.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from rl_circuits.engine.graph import GRAPHS
from rl_circuits.errors import CheckpointError, ConfigError
from rl_circuits.models.checkpoints import Checkpoint, resolve, weight_files
from rl_circuits.models.choices import SAVED
from rl_circuits.models.loading import (
    ModelMap,
    as_dtype,
    hooked_config,
    model_map_for,
    weight_table,
)

COLUMNS = ("n_params", "n_changed", "fraction_changed", "rel_norm", "effective_rank")
DEFAULT_RANK_ROWS = 8192
CHUNK = 1 << 20  # elements compared per step: bounds the float64 temporaries (8 MB each)
# Which axis of the Hugging Face tensor is the residual stream, per TransformerLens parameter.
_RESIDUAL_AXIS = {
    "W_E": 1,
    "W_Q": 1,
    "_W_K": 1,
    "_W_V": 1,
    "W_O": 0,
    "W_gate": 1,
    "W_in": 1,
    "W_out": 0,
    "W_U": 1,
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^blocks\.(\d+)\.(\w+)\.(\w+)$")


@dataclass(frozen=True)
class Piece:
    """A block of one tensor that one or more rows own: `rows`/`cols` slices of the Hugging
    Face tensor, its residual axis (None: a bias, outside the effective rank; -1: a vector
    that is one row) and the rows (nodes) that own it."""

    owners: tuple[str, ...]
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))
    axis: int | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.rows] if tensor.ndim == 1 else tensor[self.rows, self.cols]

    def stacked(self, block: torch.Tensor) -> torch.Tensor:
        """The block as rows of the residual stream: [n, d_model]."""
        if self.axis == -1:
            return block.reshape(1, -1)
        return block if self.axis == 1 else block.T

    def n_rows(self, shape: tuple[int, ...]) -> int:
        """Rows this piece adds to its owners' stacked update (0 for a bias)."""
        if self.axis is None:
            return 0
        if self.axis == -1:
            return 1
        return shape[1 - self.axis]


@dataclass
class _Totals:
    """Running sums of one row (or of the whole model)."""

    n_params: int = 0
    n_changed: int = 0
    sq_diff: float = 0.0
    sq_before: float = 0.0
    rank_rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, stats: tuple[int, int, float, float]) -> None:
        n, changed, sq_diff, sq_before = stats
        self.n_params += n
        self.n_changed += changed
        self.sq_diff += sq_diff
        self.sq_before += sq_before

    def summary(self) -> dict[str, float]:
        return {
            "n_params": self.n_params,
            "n_changed": self.n_changed,
            "fraction_changed": self.n_changed / self.n_params if self.n_params else 0.0,
            "rel_norm": _ratio(self.sq_diff, self.sq_before),
        }


def _ratio(sq_diff: float, sq_before: float) -> float:
    if sq_diff == 0.0:
        return 0.0
    return float(np.sqrt(sq_diff / sq_before)) if sq_before > 0 else float("inf")


def effective_rank(singular_values: Float[np.ndarray, " k"]) -> float:
    """exp(Shannon entropy of sigma / sum(sigma)) (Roy & Vetterli 2007); 0 for a zero matrix."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def weight_diff(
    before_dir: str | Path,
    after_dir: str | Path,
    graph: str = "paper",
    tol: float = 1e-5,
    dtype: str | torch.dtype = "bfloat16",
    *,
    rank_rows: int = DEFAULT_RANK_ROWS,
    seed: int = 0,
    revisions: tuple[str | None, str | None] = (None, None),
    progress: bool = False,
) -> pd.DataFrame:
    """Per node of `graph`: how the parameters it owns changed from `before_dir` to `after_dir`.

    Rows in residual order (see the module docstring for who owns what); columns `COLUMNS`.
    `dtype` ("bfloat16", "float32", ..., or "saved") is the precision at which a parameter
    counts as changed; `rel_norm` and `effective_rank` use the saved values. `attrs["model"]`
    holds the whole-model n_params, n_changed, fraction_changed and rel_norm. A hub id
    downloads the checkpoint at its revision in `revisions` (before, after).
    """
    if graph not in GRAPHS:
        raise ConfigError(f"graph {graph!r} is not known; choose one of {', '.join(GRAPHS)}")
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ConfigError(f"tol = {tol!r} must be a number >= 0 (the paper's is 1e-5)")
    if not (isinstance(rank_rows, int) and rank_rows >= 1):
        raise ConfigError(f"rank_rows = {rank_rows!r} must be an integer >= 1")
    cast = None if dtype == SAVED else as_dtype(dtype)
    before, after = resolve(before_dir, revisions[0]), resolve(after_dir, revisions[1])
    model_map, cfg = _same_model(before, after)
    files = {role: _tensor_files(ckpt) for role, ckpt in (("before", before), ("after", after))}
    names = _same_tensors(before, after, files["before"], files["after"])
    table = weight_table(model_map, cfg.n_layers)
    order = {hf: i for i, hf in enumerate(table)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise CheckpointError(
            f"{before.path}: tensor {unknown[0]!r} has no place in the "
            f"{model_map.architecture} map ({model_map.source.name}); the checkpoint does not "
            "match its architecture."
        )
    names = sorted(names, key=order.__getitem__)
    pieces = {n: _pieces(table[n][0], table[n][1]["layout"], graph, cfg) for n in names}
    shapes = {n: _shape(files["before"][n], n) for n in names}
    rows = _row_order(pieces, names)
    samples = _rank_samples(pieces, shapes, rows, rank_rows, seed)
    totals = {row: _Totals() for row in rows}
    model = _Totals()
    left = dict.fromkeys(rows, 0)  # pieces still to read per row: its rank is due at 0
    for piece in (p for parts in pieces.values() for p in parts):
        for row in piece.owners:
            left[row] += 1
    ranks: dict[str, float] = {}
    offsets = {row: 0 for row in rows}
    for name in tqdm(names, desc="weight diff", disable=not progress, unit="tensor"):
        old = _read(files["before"][name], name)
        new = _read(files["after"][name], name)
        if old.dtype != new.dtype and cast is None:
            raise ConfigError(
                f"tensor {name!r} is saved as {old.dtype} in {before.path} but {new.dtype} in "
                f"{after.path}; pass a dtype to compare both at (e.g. dtype='bfloat16')"
            )
        for piece in pieces[name]:  # the pieces of a tensor partition it
            block_a, block_b = piece.take(old), piece.take(new)
            stats = _stats(block_a, block_b, cast, tol)
            model.add(stats)  # once, however many rows own the piece
            n_rows = piece.n_rows(tuple(block_a.shape))
            for row in piece.owners:
                totals[row].add(stats)
                if n_rows:
                    start = offsets[row]
                    picked = samples[row]
                    local = picked[(picked >= start) & (picked < start + n_rows)] - start
                    offsets[row] += n_rows
                    if local.size:
                        index = torch.from_numpy(local)
                        rows_a = piece.stacked(block_a)[index]
                        rows_b = piece.stacked(block_b)[index]
                        totals[row].rank_rows.append(_difference(rows_a, rows_b))
                left[row] -= 1
                if left[row] == 0:
                    ranks[row] = _rank(totals[row].rank_rows)
                    totals[row].rank_rows.clear()
        del old, new
    frame = pd.DataFrame(
        [{**totals[row].summary(), "effective_rank": ranks[row]} for row in rows],
        index=pd.Index(rows, name="node"),
        columns=list(COLUMNS),
    )
    frame.attrs["model"] = {
        **model.summary(),
        "dtype": SAVED if cast is None else str(cast).removeprefix("torch."),
        "tol": float(tol),
        "graph": graph,
    }
    return frame


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b in float32, computed in float32 (exact for nearby values, Sterbenz) unless the
    checkpoint is float64."""
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(wide) - b.to(wide)).float()


def _rank(parts: list[torch.Tensor]) -> float:
    if not parts:
        return 0.0
    stacked = torch.cat(parts)
    if not torch.any(stacked):
        return 0.0
    return effective_rank(torch.linalg.svdvals(stacked).numpy())


def _stats(
    a: torch.Tensor, b: torch.Tensor, cast: torch.dtype | None, tol: float
) -> tuple[int, int, float, float]:
    """(elements, elements changed by more than `tol` at `cast`, ||a - b||^2, ||a||^2),
    computed in float64 over chunks so no full-size float64 copy is made."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    changed, sq_diff, sq_before = 0, 0.0, 0.0
    for start in range(0, flat_a.numel(), CHUNK):
        x, y = flat_a[start : start + CHUNK], flat_b[start : start + CHUNK]
        x64, y64 = x.double(), y.double()
        delta = x64 - y64
        sq_diff += float(delta.square().sum())
        sq_before += float(x64.square().sum())
        if cast is not None:
            delta = x.to(cast).double() - y.to(cast).double()
        changed += int((delta.abs() > tol).sum())
    return flat_a.numel(), changed, sq_diff, sq_before


def _pieces(tl_name: str, layout: str, graph: str, cfg) -> list[Piece]:
    """Who owns which block of the tensor that fills TransformerLens parameter `tl_name`."""
    leaf = tl_name.rsplit(".", 1)[-1]
    axis = _RESIDUAL_AXIS.get(leaf)
    if tl_name == "embed.W_E":
        return [Piece(("hook_embed",), axis=axis)]
    if tl_name == "unembed.W_U":
        return [Piece(("unembed",), axis=axis)]
    if tl_name == "ln_final.w":
        return [Piece(("ln_final",), axis=-1)]
    match = _LAYER.match(tl_name)
    if match is None:
        raise CheckpointError(f"parameter {tl_name!r} belongs to no node of the graph")
    layer, module, leaf = match.groups()
    prefix = f"blocks.{layer}"
    if module in ("ln1", "ln2"):
        return [Piece((f"{prefix}.{module}",), axis=-1)]
    if module == "mlp":
        return [Piece((f"{prefix}.hook_mlp_out",), axis=axis)]
    if module != "attn":
        raise CheckpointError(f"parameter {tl_name!r} belongs to no node of the graph")
    if graph != "heads":
        return [Piece((f"{prefix}.hook_attn_out",), axis=axis)]
    if leaf == "b_O":  # belongs to no head (rl_circuits.engine.graph)
        return [Piece((f"{prefix}.attn.b_O",))]
    d_head, n_heads, n_kv = cfg.d_head, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
    per_kv = n_heads // n_kv
    heads = [(f"{prefix}.attn.hook_result[{h}]",) for h in range(n_heads)]
    if layout in ("q_heads", "q_bias"):
        owners = [(heads[h], h) for h in range(n_heads)]
    elif layout in ("kv_heads", "kv_bias"):
        owners = [
            (tuple(heads[h][0] for h in range(g * per_kv, (g + 1) * per_kv)), g)
            for g in range(n_kv)
        ]
    elif layout == "o_heads":
        cols = [slice(h * d_head, (h + 1) * d_head) for h in range(n_heads)]
        return [Piece(heads[h], cols=cols[h], axis=axis) for h in range(n_heads)]
    else:
        raise CheckpointError(f"parameter {tl_name!r} ({layout}) cannot be split by head")
    return [
        Piece(names, rows=slice(i * d_head, (i + 1) * d_head), axis=axis) for names, i in owners
    ]


def _row_order(pieces: dict[str, list[Piece]], names: list[str]) -> list[str]:
    """Every owner once, in residual order: embed, per layer ln1, attention, ln2, MLP, then
    the final norm and unembed (the map's order, heads by index)."""
    seen: dict[str, None] = {}
    for name in names:
        for piece in pieces[name]:
            seen.update(dict.fromkeys(piece.owners))

    def key(row: str) -> tuple:
        match = re.match(r"^blocks\.(\d+)\.(.*)$", row)
        if row == "hook_embed":
            return (0,)
        if match is None:
            return (2, row != "ln_final")
        rest = match[2]
        head = re.search(r"\[(\d+)\]$", rest)
        rank = ["ln1", "hook_attn_out", "attn.hook_result", "attn.b_O", "ln2", "hook_mlp_out"]
        return (1, int(match[1]), rank.index(rest.split("[")[0]), int(head[1]) if head else 0)

    return sorted(seen, key=key)


def _rank_samples(
    pieces: dict[str, list[Piece]],
    shapes: dict[str, tuple[int, ...]],
    rows: list[str],
    rank_rows: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Per row, the sorted indices of its stacked update's rows that enter the effective rank."""
    n = {row: 0 for row in rows}
    for name, parts in pieces.items():
        for piece in parts:
            block = torch.empty(shapes[name], device="meta")
            for row in piece.owners:
                n[row] += piece.n_rows(tuple(piece.take(block).shape))
    out = {}
    for i, row in enumerate(rows):
        if n[row] <= rank_rows:
            out[row] = np.arange(n[row])
        else:
            rng = np.random.default_rng([seed, i])
            out[row] = np.sort(rng.choice(n[row], size=rank_rows, replace=False))
    return out


def _same_model(before: Checkpoint, after: Checkpoint) -> tuple[ModelMap, object]:
    """The model map and TransformerLens config both checkpoints share, else one clear error."""
    if before.architecture != after.architecture:
        raise CheckpointError(
            f"before {before.path} is a {before.architecture} but after {after.path} is a "
            f"{after.architecture}: weight_diff compares two checkpoints of one model"
        )
    model_map = model_map_for(before)
    configs = [
        hooked_config(c, model_map, dtype=torch.float32, device="cpu") for c in (before, after)
    ]
    fields = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab")
    differ = [
        f"{f} {getattr(configs[0], f)} vs {getattr(configs[1], f)}"
        for f in fields
        if getattr(configs[0], f) != getattr(configs[1], f)
    ]
    if differ:
        raise CheckpointError(
            f"before {before.path} and after {after.path} have different shapes "
            f"({'; '.join(differ)}): weight_diff compares two checkpoints of one model"
        )
    return model_map, configs[0]


def _tensor_files(ckpt: Checkpoint) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (headers only)."""
    from safetensors import safe_open

    files = weight_files(ckpt, allow_pickle=True)
    if any(file.suffix != ".safetensors" for file in files):
        raise CheckpointError(
            f"{ckpt.path} has only pickle weights; weight_diff reads safetensors only (no "
            "unpickling): convert the checkpoint with save_pretrained(safe_serialization=True)"
        )
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if not _IGNORED.match(name):
                    out[name] = file
    return out


def _same_tensors(
    before: Checkpoint,
    after: Checkpoint,
    files_before: dict[str, Path],
    files_after: dict[str, Path],
) -> list[str]:
    """The tensor names both checkpoints hold, with equal shapes, else one clear error."""
    only = [(before, n) for n in files_before if n not in files_after] + [
        (after, n) for n in files_after if n not in files_before
    ]
    if only:
        where, name = only[0]
        raise CheckpointError(
            f"tensor {name!r} is only in {where.path} ({len(only)} tensors are in one checkpoint "
            f"only; tied embeddings in one and not the other?): weight_diff compares two "
            "checkpoints of one model"
        )
    for name in files_before:
        sa, sb = _shape(files_before[name], name), _shape(files_after[name], name)
        if sa != sb:
            raise CheckpointError(
                f"tensor {name!r} has shape {sa} in {before.path} but {sb} in {after.path}: "
                "weight_diff compares two checkpoints of one model"
            )
    return list(files_before)


@contextmanager
def _open(file: Path) -> Iterator:
    """A safetensors file opened for one read: the mapping closes (and its pages leave this
    process) as soon as the tensor is copied out."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"weight file {file} is truncated or corrupted ({exc}); download it again."
        ) from exc


def _shape(file: Path, name: str) -> tuple[int, ...]:
    with _open(file) as handle:
        return tuple(handle.get_slice(name).get_shape())


def _read(file: Path, name: str) -> torch.Tensor:
    with _open(file) as handle:
        return handle.get_tensor(name)
