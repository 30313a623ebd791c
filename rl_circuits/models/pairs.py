"""The registry of model pairs: `model_maps/pairs.toml` plus user files in `<home>/pairs/*.toml`.

A pair is a model before post-training and the same model after; users (and the demo zoo)
add pairs by writing TOML entries, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rl_circuits.errors import ConfigError
from rl_circuits.resources import resource_dir

PAIR_FIELDS = {
    "before": str,
    "after": str,
    "revision_before": str,
    "revision_after": str,
    "family": str,
    "algorithm": str,
    "template": str,
    "max_new_tokens": int,
    "stop": list,
}
REQUIRED = ("before", "after", "algorithm", "template", "max_new_tokens")
# A template's fields: `{name}`; `{q}` (the question) is the only one a prompt fills.
_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
ROLES = ("before", "after")  # a pair's two models: before and after post-training
# Cross-model patching (the diff stage): "A_into_B" runs model B on model A's answer with
# A's upstream outputs patched into B's edges.
DIRECTIONS = ("after_into_before", "before_into_after")


def direction_roles(direction: str) -> tuple[str, str]:
    """(the role that runs, the role whose answer it reads and whose outputs it takes)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    source, _, target = direction.partition("_into_")
    return target, source


@dataclass(frozen=True)
class Pair:
    """One registry entry; `template` is the prompt text with `{q}` for the question."""

    name: str
    before: str
    after: str
    algorithm: str
    template: str
    max_new_tokens: int
    family: str = ""
    revision_before: str | None = None
    revision_after: str | None = None
    # Extra end-of-answer markers: strings (e.g. "<|im_end|>") and token ids, besides the
    # checkpoint's own EOS and generation_config.json ids.
    stop: tuple[str | int, ...] = ()

    def prompt(self, question: str) -> str:
        return self.template.replace("{q}", question)


@dataclass(frozen=True)
class PairModel:
    """One model of a pair (`role`: "before" or "after") answering with the pair's template:
    the unit of generation and grading."""

    pair: Pair
    role: str

    @property
    def path(self) -> str:
        return self.pair.before if self.role == "before" else self.pair.after

    @property
    def revision(self) -> str | None:
        return self.pair.revision_before if self.role == "before" else self.pair.revision_after

    @property
    def key(self) -> str:
        """Shared by pairs that use the same model, revision, template and token limit (one
        path spelled two ways, `dir` and `dir/`, is one model)."""
        path = os.path.normpath(self.path)
        parts = [path, self.revision, self.pair.template, self.pair.max_new_tokens]
        if self.pair.stop:  # pairs without their own end tokens keep their old keys
            parts.append(list(self.pair.stop))
        ident = json.dumps(parts)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.rstrip("/").split("/")[-1])[-40:]
        return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def same_checkpoint_note(pair: Pair) -> str:
    """A warning when the pair's before and after model are one checkpoint ("" otherwise)."""
    before, after = PairModel(pair, "before"), PairModel(pair, "after")
    if before.key != after.key:
        return ""
    return (
        f"pair {pair.name!r}: before and after are the same checkpoint ({pair.before}); its "
        "answers are generated and graded once, and every comparison is of the model with "
        "itself. Set after to the post-trained checkpoint."
    )


def pair_models(pairs: Iterable[Pair]) -> Iterator[PairModel]:
    """Each distinct model of `pairs` once: pairs that share a model (and template) share its
    answers."""
    seen = set()
    for pair in pairs:
        for role in ROLES:
            model = PairModel(pair, role)
            if model.key not in seen:
                seen.add(model.key)
                yield model


def home_dir() -> Path:
    """Per-user directory for the zoo cache and user pair files (env RL_CIRCUITS_HOME)."""
    return Path(os.environ.get("RL_CIRCUITS_HOME", Path.home() / ".cache" / "rl-circuits"))


def registry_files() -> list[Path]:
    user = home_dir() / "pairs"
    return [resource_dir("model_maps") / "pairs.toml", *sorted(user.glob("*.toml"))]


def parse_pairs(raw: dict, source: str, table: str = "pairs") -> dict[str, Pair]:
    """Validate the `[pairs.*]` tables of one TOML document (templates may be named);
    `table` is how messages name them (`pairs_inline` in run configs)."""
    templates = raw.get("templates", {})
    pairs = {}
    for name, entry in raw.get("pairs", {}).items():
        where = f"{source}: [{table}.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        for key, value in entry.items():
            if key not in PAIR_FIELDS:
                raise ConfigError(
                    f"{where}: unknown key {key!r}; allowed: {', '.join(PAIR_FIELDS)}"
                )
            if not isinstance(value, PAIR_FIELDS[key]):
                raise ConfigError(
                    f"{where}: {key} must be {PAIR_FIELDS[key].__name__}, got {value!r}"
                )
        missing = [key for key in REQUIRED if key not in entry]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        if entry["max_new_tokens"] < 1:
            raise ConfigError(f"{where}: max_new_tokens must be >= 1")
        stop = entry.get("stop", [])
        bad = [
            v
            for v in stop
            if isinstance(v, bool)
            or not (isinstance(v, str) and v or isinstance(v, int) and v >= 0)
        ]
        if bad:
            raise ConfigError(
                f"{where}: stop must list non-empty strings and token ids (integers >= 0), "
                f"got {bad[0]!r}"
            )
        template = templates.get(entry["template"], entry["template"])
        if "{q}" not in template:
            raise ConfigError(
                f"{where}: template {entry['template']!r} has no {{q}} placeholder and names "
                f"no entry of [templates] ({', '.join(templates) or 'none'})"
            )
        other = sorted({f"{{{f}}}" for f in _TEMPLATE_FIELD.findall(template)} - {"{q}"})
        if other:
            raise ConfigError(
                f"{where}: template field {', '.join(other)} would stay in every prompt as text: "
                "{q} (the question) is the only field a template fills; write the text itself"
            )
        pairs[name] = Pair(name=name, **{**entry, "template": template, "stop": tuple(stop)})
    return pairs


def registry_templates() -> dict[str, str]:
    """The named prompt templates of every registry file (`[templates]`), later files first."""
    templates: dict[str, str] = {}
    for file in registry_files():
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
        templates.update(raw.get("templates", {}))
    return templates


def load_pairs() -> dict[str, Pair]:
    """Every registered pair by name; later files override earlier ones."""
    pairs: dict[str, Pair] = {}
    for file in registry_files():
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
        pairs.update(parse_pairs(raw, str(file)))
    return pairs


def get_pair(name: str) -> Pair:
    pairs = load_pairs()
    if name not in pairs:
        raise ConfigError(f"unknown pair {name!r}; registered pairs: {', '.join(sorted(pairs))}")
    return pairs[name]
