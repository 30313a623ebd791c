"""Run configs: TOML files validated on load, one clear error per problem.

A config names the pairs (from the registry, or defined inline under `[pairs_inline.NAME]`),
the datasets, and the settings of each stage. Each section is a frozen dataclass whose fields
carry the key's type, default and range; the allowed values of a choice come from the module
that owns the concept (graphs from `engine.choices`, graders from `data.grading`, ...), none of
which imports torch: validating a config takes a fraction of a second.
"""

from __future__ import annotations

import math
import re
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from rl_circuits.data import choices as data_choices
from rl_circuits.data import grading, selection
from rl_circuits.engine import choices as engine_choices
from rl_circuits.engine import methods
from rl_circuits.errors import ConfigError, RLCircuitsWarning
from rl_circuits.models import choices as model_choices
from rl_circuits.models.pairs import (
    DIRECTIONS,
    Pair,
    load_pairs,
    parse_pairs,
    registry_templates,
    same_checkpoint_note,
)

_NUMBER = (int, float)
_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
_AT_LEAST_TWO = (">= 2", lambda v: v >= 2)
# "preset": what `select.rules` implies for reference and window (`selection.PRESETS`)
_PRESET = "preset"
# Pair and dataset names become folders of the run directory: no '/', no leading '.'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Rule:
    """What one config key accepts: a value of `kind`, and where it has one, in a range
    (`check`: its words and its test) or among `choices` (read from the owning module)."""

    kind: type | tuple[type, ...]
    check: tuple[str, Callable[[Any], bool]] | None = None
    owner: Callable[[], tuple[str, ...]] | None = None

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values a choice key accepts, as their owning module lists them now."""
        return None if self.owner is None else tuple(self.owner())

    @property
    def allowed(self) -> str:
        """The range in words ("" for none), as error messages give it."""
        if self.owner is not None:
            return f"one of {', '.join(map(repr, self.owner()))}"
        return "" if self.check is None else self.check[0]

    def accepts(self, value: Any) -> bool:
        """Whether `value` (already of `kind`) is in the range."""
        if self.owner is not None:
            return value in self.owner()
        return self.check is None or self.check[1](value)


def _key(
    default: Any,
    check: tuple[str, Callable[[Any], bool]] | None = None,
    *,
    choices: Callable[[], tuple[str, ...]] | None = None,
) -> Any:
    """A section field: its default, its type (that of the default: a float default takes any
    number, a tuple default a TOML list) and its range `check` or `choices` (a function that
    reads them from the module owning the concept)."""
    if isinstance(default, tuple):
        kind: type | tuple[type, ...] = list
    elif isinstance(default, float):
        kind = _NUMBER
    else:
        kind = type(default)
    return field(default=default, metadata={"rule": Rule(kind, check, choices)})


def rule(section: type, key: str) -> Rule:
    """The `Rule` of `section`'s field `key` (the type, range and choices it accepts)."""
    return next(f.metadata["rule"] for f in fields(section) if f.name == key)


@dataclass(frozen=True)
class RunSection:
    """[run], or the top level of the file: where the run lives and what it runs on."""

    run_dir: str = _key("runs/default", ("a non-empty path", lambda v: bool(v.strip())))
    pairs: tuple[str, ...] = _key(())
    datasets: tuple[str, ...] = _key(())
    data_dir: str = _key("")
    split: str = _key("test")
    limit: int = _key(0, _NON_NEGATIVE)  # 0: every question
    ids: tuple[str, ...] = _key(())  # only these question ids ("gsm8k-12", ...); (): all
    # `rl-circuits tiny-models` output that the config runs on; written first if absent
    tiny_models: str = _key("")


@dataclass(frozen=True)
class ModelSection:
    """[model]: how checkpoints load."""

    dtype: str = _key("bfloat16", choices=lambda: model_choices.DTYPE_NAMES)
    device: str = _key("auto")
    n_devices: int = _key(1, _AT_LEAST_ONE)
    allow_pickle: bool = _key(False)


@dataclass(frozen=True)
class GenerateSection:
    """[generate]: how both models answer the questions."""

    backend: str = _key("hf", choices=lambda: data_choices.BACKENDS)
    batch_size: int = _key(8, _AT_LEAST_ONE)
    temperature: float = _key(0.0, _NON_NEGATIVE)
    seed: int = _key(0)
    max_new_tokens: int = _key(0, _NON_NEGATIVE)  # 0: the pair's own limit
    chunk_size: int = _key(64, _AT_LEAST_ONE)
    end_token: str = _key("drop", choices=lambda: data_choices.END_TOKENS)


@dataclass(frozen=True)
class GradeSection:
    """[grade]: how answers are graded."""

    timeout: float = _key(5.0, _POSITIVE)
    grader: str = _key("math-verify", choices=lambda: grading.GRADERS)


@dataclass(frozen=True)
class SelectSection:
    """[select]: which questions are scored, and the truncation fractions alpha."""

    # >= 2: the paired bootstrap and sample diversity need two questions
    n: int = _key(100, _AT_LEAST_TWO)
    seed: int = _key(42)
    alphas: tuple[float, ...] = _key(selection.DEFAULT_ALPHAS)
    beta: float = _key(0.5, _POSITIVE)
    gamma: float = _key(1.5, _POSITIVE)
    delta: float = _key(0.5, ("in (0, 1]", lambda v: 0 < v <= 1))
    reference: str = _key(_PRESET, choices=lambda: (_PRESET, *selection.REFERENCES))
    window: str = _key(_PRESET, choices=lambda: (_PRESET, *selection.WINDOWS))
    rules: str = _key("paper-text", choices=lambda: selection.RULES)
    subset: str = _key("both_correct", choices=lambda: selection.SUBSETS)


@dataclass(frozen=True)
class AttributeSection:
    """[attribute]: the graph and method of the edge scores."""

    graph: str = _key("paper", choices=lambda: engine_choices.GRAPHS)
    method: str = _key("eap", choices=lambda: methods.methods_for("zero"))
    ig_steps: int = _key(8, _AT_LEAST_ONE)
    batch_size: int = _key(1, _AT_LEAST_ONE)
    efficient_attention: bool = _key(True)
    checkpoint: bool = _key(False)


@dataclass(frozen=True)
class CircuitsSection:
    """[circuits]: the optional faithfulness stage (`rl_circuits.pipeline.circuits`)."""

    enabled: bool = _key(False)
    points: int = _key(20, _AT_LEAST_TWO)  # log grid of k, 1 edge to all
    thresholds: tuple[float, ...] = _key((0.8, 0.9))  # circuit size: smallest k, f(k) >= t
    ablation: str = _key("zero", choices=lambda: methods.PLAIN_ABLATIONS)
    ranking: str = _key(
        "abs", choices=lambda: engine_choices.RANKINGS
    )  # top edges by |score| or score
    rank_by: str = _key("mean", choices=lambda: engine_choices.RANK_BY)
    alphas: tuple[float, ...] = _key(())  # cells to evaluate; (): every select.alphas entry
    batch_size: int = _key(8, _AT_LEAST_ONE)
    # Methods ranked by faithfulness per cell (MIB's CPR/CMD, Spearman with exact on n_exact
    # edges): `rl_circuits.analysis.method_ranking`; (): none.
    methods: tuple[str, ...] = _key(())
    n_exact: int = _key(64, _AT_LEAST_TWO)


@dataclass(frozen=True)
class DiffSection:
    """[diff]: the optional cross-model patching stage (`rl_circuits.pipeline.diff`)."""

    enabled: bool = _key(False)
    method: str = _key("eap", choices=lambda: methods.methods_for("patch", cross_model=True))
    graph: str = _key("paper", choices=lambda: engine_choices.GRAPHS)
    alphas: tuple[float, ...] = _key(())  # cells to patch; (): every select.alphas entry
    directions: tuple[str, ...] = _key(DIRECTIONS)  # entries from models.pairs.DIRECTIONS
    points: int = _key(20, _AT_LEAST_TWO)  # log grid of k for the diff circuit curve
    batch_size: int = _key(8, _AT_LEAST_ONE)  # questions per forward (fixed batches)


@dataclass(frozen=True)
class AnalyzeSection:
    """[analyze]: the statistics of Table 1 and the report."""

    n_resamples: int = _key(1000, _AT_LEAST_ONE)
    seed: int = _key(0)
    bins: int = _key(100, _AT_LEAST_ONE)
    edges: str = _key("all", choices=lambda: engine_choices.EDGE_SETS)


@dataclass(frozen=True)
class WeightsSection:
    """[weights]: the parameter update of each node (`rl_circuits.pipeline.weights`)."""

    enabled: bool = _key(True)
    # a parameter counts as changed where |after - before| > tol, both cast to dtype
    dtype: str = _key("bfloat16", choices=lambda: model_choices.WEIGHT_DTYPES)
    tol: float = _key(1e-5, _NON_NEGATIVE)
    rank_rows: int = _key(8192, _AT_LEAST_ONE)  # rows of a node's update in its effective rank
    n_permutations: int = _key(10000, _AT_LEAST_ONE)  # for the weight-edge rank correlation
    seed: int = _key(0)


@dataclass(frozen=True)
class RunConfig:
    """A validated config: one frozen section per stage (`cfg.select.n`), the pairs it uses by
    name, and where it came from."""

    run: RunSection
    model: ModelSection
    generate: GenerateSection
    grade: GradeSection
    select: SelectSection
    attribute: AttributeSection
    circuits: CircuitsSection
    diff: DiffSection
    analyze: AnalyzeSection
    weights: WeightsSection
    pairs: dict[str, Pair]
    source: str

    @property
    def alphas(self) -> list[float]:
        """select.alphas as floats: the alpha of each attribution cell."""
        return [float(a) for a in self.select.alphas]

    def section(self, name: str) -> Any:
        """The section called `name` ("select", ...), for code that walks every section."""
        if name not in SECTIONS:
            raise KeyError(name)
        return getattr(self, name)

    def resolved(self) -> dict[str, Any]:
        """Everything that determines the results, for the run store's config check: each
        section as a {key: value} table (lists as TOML gives them) and each pair's fields."""
        pairs = {
            name: {k: v for k, v in vars(pair).items() if k != "stop" or v}
            for name, pair in sorted(self.pairs.items())
        }
        return {**{name: _table(self.section(name)) for name in SECTIONS}, "pairs": pairs}


# section name -> its dataclass, in the order of RunConfig's fields
SECTIONS: dict[str, type] = {
    name: kind for name, kind in get_type_hints(RunConfig).items() if is_dataclass(kind)
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _table(section: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


def defaults() -> dict[str, dict[str, Any]]:
    """Every key's default, {section: {key: value}} in the form `RunConfig.resolved` gives."""
    return {name: _table(kind()) for name, kind in SECTIONS.items()}


def upgrade_resolved(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored resolved config in the current format: keys added since it was written get
    their defaults, so a newer version's new settings are no change for old runs."""
    out = dict(stored)
    for section, table_defaults in defaults().items():
        table = stored.get(section, {})
        if isinstance(table, dict):
            out[section] = {**table_defaults, **table}
    pairs = stored.get("pairs")
    if isinstance(pairs, dict):
        pair_defaults = {
            f.name: f.default for f in fields(Pair) if f.default is not MISSING and f.name != "stop"
        }
        out["pairs"] = {
            name: {**pair_defaults, **entry} if isinstance(entry, dict) else entry
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
    return parse_config(doc, source, stored=True)


def dump_config(cfg: RunConfig) -> str:
    """The TOML text of `cfg` that `load_config` reads back into an equal config (the same
    `resolved()`): every section's values, and its pairs as `[pairs_inline.NAME]` tables
    (an inline pair overrides a registered pair of the same name)."""
    doc: dict[str, Any] = {name: _table(cfg.section(name)) for name in SECTIONS}
    doc["pairs_inline"] = {
        name: {
            k: _plain(v)
            for k, v in vars(pair).items()
            if k != "name" and v is not None and (k != "stop" or v)
        }
        for name, pair in sorted(cfg.pairs.items())
    }
    return tomli_w.dumps(doc)


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
    raw: dict[str, Any],
    source: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    stored: bool = False,
) -> RunConfig:
    """Validate a config document; the top-level keys form the `[run]` section. Pairs that are
    probably not what the user meant get an `RLCircuitsWarning`, unless `stored` (a run's
    config.json, which lists every pair inline)."""
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
    values: dict[str, Any] = {}
    for section, table in sections.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed: {', '.join(SECTIONS)}"
            )
        values[section] = _validate_section(section, table, source)
    for section in SECTIONS:
        values.setdefault(section, _validate_section(section, {}, source))
    _check_cross_fields(values["run"], values["select"], values["circuits"], source)
    _check_diff(values["diff"], values["select"], source)
    pairs = _pairs(values["run"].pairs, inline_pairs, source, warn=not stored)
    return RunConfig(**values, pairs=pairs, source=source)


def _validate_section(section: str, table: dict, source: str) -> Any:
    """The section `section` from its TOML table: each key's type and range checked against
    its field's `Rule`, absent keys at their defaults."""
    kind = SECTIONS[section]
    rules = {f.name: f.metadata["rule"] for f in fields(kind)}
    out = {}
    for key, value in table.items():
        where = f"{source}: {key}" if section == "run" else f"{source}: {section}.{key}"
        if key not in rules:
            raise ConfigError(f"{where} is not a known key; allowed: {', '.join(rules)}")
        r = rules[key]
        allowed = f" ({r.allowed})" if r.allowed else ""
        if isinstance(value, bool) and r.kind is not bool or not isinstance(value, r.kind):
            expected = r.kind.__name__ if isinstance(r.kind, type) else "number"
            article = "an" if expected[0] in "aeiou" else "a"
            raise ConfigError(f"{where} must be {article} {expected}{allowed}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number{allowed}")
        if not r.accepts(value):
            raise ConfigError(f"{where} = {value!r} is out of range: must be {r.allowed}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return kind(**out)


def _check_cross_fields(
    run: RunSection, select: SelectSection, circuits: CircuitsSection, source: str
) -> None:
    """What one key cannot check alone: ranges that depend on another key, list entries."""
    if select.beta > select.gamma:
        raise ConfigError(
            f"{source}: select.beta = {select.beta} > select.gamma = {select.gamma}; "
            "the length window needs beta <= gamma"
        )
    alphas = list(select.alphas)
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
    for key, allowed in (("thresholds", "in (0, 1]"), ("alphas", "among select.alphas")):
        entries = list(getattr(circuits, key))
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
    usable = methods.methods_for(circuits.ablation)
    ranked = list(circuits.methods)
    if not all(isinstance(m, str) and m in usable for m in ranked) or len(set(ranked)) < len(
        ranked
    ):
        raise ConfigError(
            f"{source}: circuits.methods = {ranked!r} is out of range: list each method once, "
            f"among {', '.join(usable)} (the methods defined for circuits.ablation = "
            f"{circuits.ablation!r})"
        )
    for key in ("pairs", "datasets"):
        names = getattr(run, key)
        if not names or not all(isinstance(v, str) and v for v in names):
            raise ConfigError(f"{source}: {key} must be a non-empty list of names")
        bad = [v for v in names if not _NAME.fullmatch(v)]
        if bad:
            raise ConfigError(
                f"{source}: {key} entry {bad[0]!r} is not a plain name: it names folders of the "
                "run directory, so use letters, digits, '_', '-' and '.' (not first), without "
                "'/' or '..'"
            )
        twice = sorted({v for v in names if names.count(v) > 1})
        if twice:
            raise ConfigError(
                f"{source}: {key} lists {', '.join(map(repr, twice))} more than once; list each "
                "once"
            )
    if not all(isinstance(i, str) and i for i in run.ids):
        raise ConfigError(f"{source}: ids must be a list of question ids such as 'gsm8k-12'")
    stray = [i for i in run.ids if not any(i.startswith(f"{d}-") for d in run.datasets)]
    if stray:
        raise ConfigError(
            f"{source}: ids entry {stray[0]!r} names no dataset of this run: an id is "
            f"DATASET-ID with DATASET among {', '.join(run.datasets)} (e.g. "
            f"'{run.datasets[0]}-12')"
        )
    twice = sorted({i for i in run.ids if run.ids.count(i) > 1})
    if twice:
        raise ConfigError(f"{source}: ids lists {twice[0]!r} more than once; list each once")


def _check_diff(diff: DiffSection, select: SelectSection, source: str) -> None:
    """diff.alphas among select.alphas; diff.directions a non-empty list of known directions."""
    alphas = [float(a) for a in select.alphas]
    entries = list(diff.alphas)
    if not all(
        not isinstance(v, bool) and isinstance(v, int | float) and float(v) in alphas
        for v in entries
    ):
        raise ConfigError(
            f"{source}: diff.alphas = {entries!r} is out of range: each entry must be a number "
            f"among select.alphas ({', '.join(f'{a:g}' for a in alphas)}); [] for all of them"
        )
    directions = list(diff.directions)
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise ConfigError(
            f"{source}: diff.directions = {directions!r} is out of range: a non-empty list "
            f"of {', '.join(map(repr, DIRECTIONS))}"
        )
    if len(set(directions)) != len(directions):
        raise ConfigError(f"{source}: diff.directions = {directions!r} lists one twice")


def _pairs(
    names: tuple[str, ...], inline: dict[str, Pair], source: str, *, warn: bool
) -> dict[str, Pair]:
    registered = load_pairs()
    registry = {**registered, **inline}
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(
            f"{source}: unknown pair {', '.join(map(repr, unknown))}; registered: "
            f"{', '.join(sorted(registry))} (or define it under [pairs_inline.NAME])"
        )
    for name in names if warn else ():
        old, new = registered.get(name), registry[name]
        notes = [same_checkpoint_note(new)]
        if name in inline and old is not None and old != new:
            differ = [k for k in vars(new) if getattr(old, k) != getattr(new, k)]
            notes.append(
                f"{source}: [pairs_inline.{name}] replaces the registered pair {name!r} "
                f"(it differs in {', '.join(differ)}); name it otherwise to keep both apart"
            )
        for note in filter(None, notes):
            warnings.warn(note, RLCircuitsWarning, stacklevel=4)
    return {name: registry[name] for name in names}
