"""What several stages share: the device, a dataset's questions, a shard's slice of the work,
and loading one model of a pair for the scoring stages (attribute, circuits)."""

from __future__ import annotations

import os
from pathlib import Path

from rl_circuits.config import RunConfig
from rl_circuits.errors import ConfigError
from rl_circuits.models.pairs import PairModel
from rl_circuits.store.layout import RunLayout, check_shard
from rl_circuits.store.run import RunStore


def device_of(cfg: RunConfig) -> str:
    """model.device ("auto": cuda if available), refused clearly when unusable here."""
    from rl_circuits.models.loading import check_device

    try:
        return str(check_device(cfg.model.device))
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: model.{exc}") from None


def run_root(cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> Path:
    """The run directory: `run_dir` (--run-dir) if given, else the config's run.run_dir; an
    empty `run_dir` is refused rather than read as "not given"."""
    if run_dir is None:
        return Path(cfg.run.run_dir).expanduser()
    if not os.fspath(run_dir).strip():
        raise ConfigError(
            f"run directory {os.fspath(run_dir)!r} (--run-dir) names no directory: give one, "
            f"or leave --run-dir out to use the config's run_dir ({cfg.run.run_dir})"
        )
    return Path(run_dir).expanduser()


def circuit_alphas(cfg: RunConfig) -> list[float]:
    """The alphas whose cells get circuits: `circuits.alphas`, or every selection alpha."""
    return [float(a) for a in cfg.circuits.alphas] or cfg.alphas


def diff_alphas(cfg: RunConfig) -> list[float]:
    """The alphas whose cells are patched: `diff.alphas`, or every selection alpha."""
    return [float(a) for a in cfg.diff.alphas] or cfg.alphas


def questions(store: RunStore, dataset: str) -> list[dict]:
    """The dataset's normalised records ({id, question, gold}) as the datasets stage wrote them."""
    return store.read_jsonl(RunLayout.dataset(dataset))


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def shard_of(store: RunStore, shard: tuple[int, int] | None = None) -> tuple[int, int]:
    """The slice (i, n) a stage call processes: `shard`, else the store's, else everything."""
    if shard is None:
        return store.shard or (0, 1)
    index, count = check_shard(shard, error=ConfigError)
    if store.shard is not None and (index, count) != store.shard:
        raise ConfigError(
            f"shard {index}/{count} differs from the store's shard "
            f"{store.shard[0]}/{store.shard[1]}"
        )
    return index, count


def in_shard(position: int, shard: tuple[int, int]) -> bool:
    """Whether unit of work number `position` belongs to shard (i, n): every n-th from i."""
    return position % shard[1] == shard[0]


def load_for_scoring(cfg: RunConfig, model: PairModel, max_seq_len: int):
    """One model of a pair as the config's [model] section asks, for sequences up to
    `max_seq_len` tokens (the attribute and circuits stages)."""
    from rl_circuits.models.loading import as_dtype, load_model

    return load_model(
        model.path,
        revision=model.revision,
        dtype=as_dtype(cfg.model.dtype),
        device=device_of(cfg),
        n_devices=cfg.model.n_devices,
        max_seq_len=max_seq_len,
        allow_pickle=cfg.model.allow_pickle,
    )
