"""Run configs: TOML files validated on load, one clear error per problem.

A config names the pairs (from the registry, or defined inline under `[pairs.NAME]`), the
datasets, and the settings of each stage; every key has a type, a default and a range.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_circuits.errors import ConfigError
from rl_circuits.models.pairs import Pair, load_pairs, parse_pairs, registry_templates

_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
# Pair and dataset names become folders of the run directory: no '/', no leading '.'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _one_of(*choices):
    return (f"one of {', '.join(map(repr, choices))}", lambda v: v in choices)


# section -> key -> (type, default, (range text, check) or None)
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any, Any]]] = {
    "run": {
        "run_dir": (str, "runs/default", None),
        "pairs": (list, [], None),
        "datasets": (list, [], None),
        "data_dir": (str, "", None),
        "split": (str, "test", None),
        "limit": (int, 0, _NON_NEGATIVE),  # 0: every question
        "ids": (list, [], None),  # only these question ids ("gsm8k-12", ...); []: all
        # `rl-circuits tiny-models` output that the config runs on; written first if absent
        "tiny_models": (str, "", None),
    },
    "model": {
        "dtype": (str, "bfloat16", _one_of("float32", "bfloat16", "float16", "float64")),
        "device": (str, "auto", None),
        "n_devices": (int, 1, _AT_LEAST_ONE),
        "allow_pickle": (bool, False, None),
    },
    "generate": {
        "backend": (str, "hf", _one_of("hf", "vllm")),
        "batch_size": (int, 8, _AT_LEAST_ONE),
        "temperature": ((int, float), 0.0, _NON_NEGATIVE),
        "seed": (int, 0, None),
        "max_new_tokens": (int, 0, _NON_NEGATIVE),  # 0: the pair's own limit
        "chunk_size": (int, 64, _AT_LEAST_ONE),
        # "keep": the token that ended an answer stays in it and its length counts it (vLLM's
        # token_ids, as the authors stored them); "drop": it is removed.
        "end_token": (str, "drop", _one_of("drop", "keep")),
    },
    "grade": {
        "timeout": ((int, float), 5.0, _POSITIVE),
        "grader": (str, "math-verify", _one_of("math-verify", "authors")),
    },
    "select": {
        # >= 2: the paired bootstrap and sample diversity need two questions
        "n": (int, 100, (">= 2", lambda v: v >= 2)),
        "seed": (int, 42, None),
        "alphas": (list, [0.03, 0.1, 0.3, 0.5], None),
        "beta": ((int, float), 0.5, _POSITIVE),
        "gamma": ((int, float), 1.5, _POSITIVE),
        "delta": ((int, float), 0.5, ("in (0, 1]", lambda v: 0 < v <= 1)),
        # "preset": what `rules` implies (paper-text: mean / each; authors-code: min / pair_mean)
        "reference": (str, "preset", _one_of("preset", "min", "mean")),
        "window": (str, "preset", _one_of("preset", "pair_mean", "each")),
        "rules": (str, "paper-text", _one_of("paper-text", "authors-code")),
        "subset": (
            str,
            "both_correct",
            _one_of("both_correct", "both_wrong", "only_before", "only_after"),
        ),
    },
    "attribute": {
        "graph": (str, "paper", _one_of("paper", "block", "residual", "heads")),
        "method": (str, "eap", _one_of("eap", "eap-ig", "exact")),
        "ig_steps": (int, 8, _AT_LEAST_ONE),
        "batch_size": (int, 1, _AT_LEAST_ONE),
        "efficient_attention": (bool, True, None),
        "checkpoint": (bool, False, None),
    },
    "circuits": {  # the optional faithfulness stage (rl_circuits.pipeline.circuits)
        "enabled": (bool, False, None),
        "points": (int, 20, (">= 2", lambda v: v >= 2)),  # log grid of k, 1 edge to all
        "thresholds": (list, [0.8, 0.9], None),  # circuit size: smallest k with f(k) >= t
        "ablation": (str, "zero", _one_of("zero", "mean")),
        "ranking": (str, "abs", _one_of("abs", "signed")),  # top edges by |score| or score
        "rank_by": (str, "mean", _one_of("mean", "sample")),  # mean over questions, or each
        "alphas": (list, [], None),  # cells to evaluate; []: every select.alphas entry
        "batch_size": (int, 8, _AT_LEAST_ONE),
    },
    "analyze": {
        "n_resamples": (int, 1000, _AT_LEAST_ONE),
        "seed": (int, 0, None),
        "bins": (int, 100, _AT_LEAST_ONE),
        "edges": (str, "all", _one_of("all", "valid")),
    },
}


@dataclass(frozen=True)
class RunConfig:
    """A validated config: `values[section][key]`, the pairs it uses, and where it came from."""

    values: dict[str, dict[str, Any]]
    pairs: dict[str, Pair]
    source: str

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def alphas(self) -> list[float]:
        return [float(a) for a in self.values["select"]["alphas"]]

    def resolved(self) -> dict[str, Any]:
        """Everything that determines the results, for the run store's config check."""
        pairs = {
            name: {k: v for k, v in vars(pair).items() if k != "stop" or v}
            for name, pair in sorted(self.pairs.items())
        }
        return {**self.values, "pairs": pairs}


def upgrade_resolved(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored resolved config in the current format: keys added since it was written get
    their defaults, so a newer version's new settings are no change for old runs."""
    import dataclasses

    from rl_circuits.models.pairs import Pair

    out = dict(stored)
    for section, schema in SCHEMA.items():
        table = stored.get(section, {})
        if isinstance(table, dict):
            out[section] = {**{k: d for k, (_, d, _) in schema.items()}, **table}
    pairs = stored.get("pairs")
    if isinstance(pairs, dict):
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(Pair)
            if f.default is not dataclasses.MISSING and f.name != "stop"
        }
        out["pairs"] = {
            name: {**defaults, **entry} if isinstance(entry, dict) else entry
            for name, entry in pairs.items()
        }
    return out


def config_from_resolved(resolved: dict[str, Any], source: str) -> RunConfig:
    """Parse a stored resolved config (config.json of a run) back into a `RunConfig`."""
    if not isinstance(resolved, dict) or not isinstance(resolved.get("run"), dict):
        raise ConfigError(f"{source} is not a run config (no run table)")
    doc = {k: v for k, v in resolved.items() if k not in ("run", "pairs")}
    doc["run"] = resolved["run"]
    doc["pairs_inline"] = {
        name: {k: v for k, v in pair.items() if k != "name" and v is not None}
        for name, pair in (resolved.get("pairs") or {}).items()
    }
    return parse_config(doc, source)


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Read and validate a TOML config file (`overrides` replace keys, as the CLI's flags do)."""
    path = Path(path)
    if path.is_dir():
        hint = (
            " (a run directory? pass the TOML config it was made with)"
            if (path / "config.json").is_file()
            else ""
        )
        raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(raw, str(path), overrides)


def parse_config(
    raw: dict[str, Any], source: str, overrides: dict[str, dict[str, Any]] | None = None
) -> RunConfig:
    """Validate a config document; the top-level keys form the `[run]` section."""
    raw = dict(raw)
    inline = raw.pop("pairs_inline", {})
    if not isinstance(inline, dict):
        raise ConfigError(f"{source}: pairs_inline must be tables [pairs_inline.NAME]")
    # inline pairs have the registry's fields, named templates included
    templates = registry_templates() if inline else {}
    inline_pairs = parse_pairs(
        {"pairs": inline, "templates": templates}, source, table="pairs_inline"
    )
    sections = {name: raw.pop(name) for name in list(raw) if isinstance(raw[name], dict)}
    # run settings go at the top level or in an explicit [run] table, not both
    both = sorted(set(raw) & set(sections.get("run", {})))
    if both:
        raise ConfigError(
            f"{source}: {', '.join(both)} is set both at the top level and in [run]; keep one"
        )
    sections["run"] = {**raw, **sections.get("run", {})}
    for section, table in (overrides or {}).items():
        sections.setdefault(section, {}).update(table)
    values: dict[str, dict[str, Any]] = {}
    for section, table in sections.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed: {', '.join(SCHEMA)}"
            )
        values[section] = _validate_section(section, table, source)
    for section in SCHEMA:
        values.setdefault(section, _validate_section(section, {}, source))
    _check_cross_fields(values, source)
    return RunConfig(values, _pairs(values["run"]["pairs"], inline_pairs, source), source)


def _validate_section(section: str, table: dict, source: str) -> dict[str, Any]:
    schema = SCHEMA[section]
    out = {}
    for key, value in table.items():
        where = f"{source}: {key}" if section == "run" else f"{source}: {section}.{key}"
        if key not in schema:
            raise ConfigError(f"{where} is not a known key; allowed: {', '.join(schema)}")
        kind, _, check = schema[key]
        allowed = f" ({check[0]})" if check is not None else ""
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            article = "an" if expected[0] in "aeiou" else "a"
            raise ConfigError(f"{where} must be {article} {expected}{allowed}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number{allowed}")
        if check is not None and not check[1](value):
            raise ConfigError(f"{where} = {value!r} is out of range: must be {check[0]}")
        out[key] = value
    return {key: out.get(key, default) for key, (_, default, _) in schema.items()}


def _check_cross_fields(values: dict[str, dict[str, Any]], source: str) -> None:
    select, run = values["select"], values["run"]
    if select["beta"] > select["gamma"]:
        raise ConfigError(
            f"{source}: select.beta = {select['beta']} > select.gamma = {select['gamma']}; "
            "the length window needs beta <= gamma"
        )
    alphas = select["alphas"]
    if not alphas or any(
        isinstance(a, bool) or not isinstance(a, int | float) or not 0 < a <= 1 for a in alphas
    ):
        raise ConfigError(
            f"{source}: select.alphas = {alphas!r} is out of range: must be a non-empty list of "
            "numbers in (0, 1] (alpha is the fraction of the reference length scored; above 1 "
            "every answer is too short)"
        )
    # alpha-A folders are named with format(A, "g"): two alphas with one name would share one
    names = [f"{float(a):g}" for a in alphas]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"{source}: select.alphas = {alphas!r} lists alpha {', '.join(twice)} more than once "
            "(values equal to 6 significant digits count as one); list each alpha once"
        )
    circuits = values["circuits"]
    for key, allowed in (("thresholds", "in (0, 1]"), ("alphas", "among select.alphas")):
        entries = circuits[key]
        ok = all(
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and (0 < v <= 1 if key == "thresholds" else float(v) in map(float, alphas))
            for v in entries
        )
        if not ok or (key == "thresholds" and not entries):
            raise ConfigError(
                f"{source}: circuits.{key} = {entries!r} is out of range: each entry must be "
                f"a number {allowed}"
            )
    for key in ("pairs", "datasets"):
        if not run[key] or not all(isinstance(v, str) and v for v in run[key]):
            raise ConfigError(f"{source}: {key} must be a non-empty list of names")
        bad = [v for v in run[key] if not _NAME.fullmatch(v)]
        if bad:
            raise ConfigError(
                f"{source}: {key} entry {bad[0]!r} is not a plain name: it names folders of the "
                "run directory, so use letters, digits, '_', '-' and '.' (not first), without "
                "'/' or '..'"
            )
        twice = sorted({v for v in run[key] if run[key].count(v) > 1})
        if twice:
            raise ConfigError(
                f"{source}: {key} lists {', '.join(map(repr, twice))} more than once; list each "
                "once"
            )
    if not all(isinstance(i, str) and i for i in run["ids"]):
        raise ConfigError(f"{source}: ids must be a list of question ids such as 'gsm8k-12'")
    stray = [i for i in run["ids"] if not any(i.startswith(f"{d}-") for d in run["datasets"])]
    if stray:
        raise ConfigError(
            f"{source}: ids entry {stray[0]!r} names no dataset of this run: an id is "
            f"DATASET-ID with DATASET among {', '.join(run['datasets'])} (e.g. "
            f"'{run['datasets'][0]}-12')"
        )
    twice = sorted({i for i in run["ids"] if run["ids"].count(i) > 1})
    if twice:
        raise ConfigError(f"{source}: ids lists {twice[0]!r} more than once; list each once")


def _pairs(names: list[str], inline: dict[str, Pair], source: str) -> dict[str, Pair]:
    registry = {**load_pairs(), **inline}
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(
            f"{source}: unknown pair {', '.join(map(repr, unknown))}; registered: "
            f"{', '.join(sorted(registry))} (or define it under [pairs_inline.NAME])"
        )
    return {name: registry[name] for name in names}
