"""Run configs as typed sections: defaults, ranges, choices owned by their modules, overrides,
and a run written before the sections existed loading and planning unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rl_circuits.config import (
    SECTIONS,
    AttributeSection,
    CircuitsSection,
    DiffSection,
    GenerateSection,
    GradeSection,
    ModelSection,
    RunConfig,
    SelectSection,
    config_from_resolved,
    defaults,
    dump_config,
    load_config,
    parse_config,
    rule,
    upgrade_resolved,
)
from rl_circuits.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
FIXTURE = Path(__file__).parent / "fixtures" / "config_94d74f2.json"
MINIMAL = {"pairs": ["mistral"], "datasets": ["gsm8k"]}


def test_one_frozen_section_per_table():
    names = [f.name for f in dataclasses.fields(RunConfig)]
    assert names == [*SECTIONS, "pairs", "source"]
    assert list(SECTIONS) == [
        "run",
        "model",
        "generate",
        "grade",
        "select",
        "attribute",
        "circuits",
        "diff",
        "analyze",
        "weights",
    ]
    cfg = parse_config(MINIMAL, "c.toml")
    for name, kind in SECTIONS.items():
        section = cfg.section(name)
        assert type(section) is kind and getattr(cfg, name) is section
        for f in dataclasses.fields(kind):
            assert f.metadata["rule"].kind is not None, f"{name}.{f.name} has no type"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.select.n = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.select = SelectSection()
    with pytest.raises(KeyError):
        cfg.section("pairs")


def test_defaults_fill_every_absent_key():
    cfg = parse_config({**MINIMAL, "select": {"n": 7}}, "c.toml")
    resolved = cfg.resolved()
    expected = defaults()
    expected["run"].update(pairs=["mistral"], datasets=["gsm8k"])
    expected["select"]["n"] = 7
    assert {k: v for k, v in resolved.items() if k != "pairs"} == expected
    # TOML lists are tuples in the frozen sections and lists again in resolved()
    assert cfg.select.alphas == (0.03, 0.1, 0.3, 0.5) and cfg.run.pairs == ("mistral",)
    assert resolved["select"]["alphas"] == [0.03, 0.1, 0.3, 0.5]
    assert cfg.alphas == [0.03, 0.1, 0.3, 0.5]
    assert SelectSection().n == 100 and GradeSection().grader == "math-verify"


def test_every_choice_comes_from_its_owning_module():
    from rl_circuits.data import choices, grading, selection
    from rl_circuits.engine import choices as engine
    from rl_circuits.engine import methods
    from rl_circuits.models import loading

    owned = {
        (ModelSection, "dtype"): tuple(loading.DTYPES),
        (GenerateSection, "backend"): choices.BACKENDS,
        (GenerateSection, "end_token"): choices.END_TOKENS,
        (GradeSection, "grader"): grading.GRADERS,
        (SelectSection, "rules"): selection.RULES,
        (SelectSection, "subset"): selection.SUBSETS,
        (AttributeSection, "graph"): engine.GRAPHS,
        (AttributeSection, "method"): methods.methods_for("zero"),
        (CircuitsSection, "ablation"): methods.PLAIN_ABLATIONS,
        (CircuitsSection, "ranking"): engine.RANKINGS,
        (CircuitsSection, "rank_by"): engine.RANK_BY,
        (DiffSection, "method"): methods.methods_for("patch", cross_model=True),
        (DiffSection, "graph"): engine.GRAPHS,
    }
    for (section, key), values in owned.items():
        assert rule(section, key).choices == values, f"{section.__name__}.{key}"
    # "preset": whatever select.rules implies (selection.PRESETS)
    assert rule(SelectSection, "reference").choices == ("preset", *selection.REFERENCES)
    assert rule(SelectSection, "window").choices == ("preset", *selection.WINDOWS)
    assert SelectSection().alphas == selection.DEFAULT_ALPHAS
    choice_keys = {
        (kind, f.name)
        for kind in SECTIONS.values()
        for f in dataclasses.fields(kind)
        if f.metadata["rule"].choices is not None
    }
    from rl_circuits.config import AnalyzeSection, WeightsSection
    from rl_circuits.models import choices as model_choices

    assert rule(AnalyzeSection, "edges").choices == engine.EDGE_SETS
    assert rule(WeightsSection, "dtype").choices == model_choices.WEIGHT_DTYPES
    assert choice_keys == {*owned, (SelectSection, "reference"), (SelectSection, "window")} | {
        (AnalyzeSection, "edges"),
        (WeightsSection, "dtype"),
    }


def test_a_value_added_to_an_owning_module_is_accepted(monkeypatch):
    """The config re-types no list of names: a graph, grader, ... added where the concept lives
    is a valid config value at once (and listed in the error for a wrong one)."""
    from rl_circuits.data import choices as data_choices
    from rl_circuits.data import grading
    from rl_circuits.engine import choices as engine_choices
    from rl_circuits.models import choices as model_choices

    monkeypatch.setattr(engine_choices, "GRAPHS", (*engine_choices.GRAPHS, "mlp-only"))
    monkeypatch.setattr(grading, "GRADERS", (*grading.GRADERS, "sympy"))
    monkeypatch.setattr(data_choices, "BACKENDS", (*data_choices.BACKENDS, "sglang"))
    monkeypatch.setattr(model_choices, "DTYPE_NAMES", (*model_choices.DTYPE_NAMES, "float8"))
    doc = {
        **MINIMAL,
        "attribute": {"graph": "mlp-only"},
        "grade": {"grader": "sympy"},
        "generate": {"backend": "sglang"},
        "model": {"dtype": "float8"},
    }
    cfg = parse_config(doc, "c.toml")
    assert (cfg.attribute.graph, cfg.grade.grader, cfg.generate.backend, cfg.model.dtype) == (
        "mlp-only",
        "sympy",
        "sglang",
        "float8",
    )
    with pytest.raises(ConfigError) as info:
        parse_config({**doc, "attribute": {"graph": "nope"}}, "c.toml")
    assert str(info.value) == (
        "c.toml: attribute.graph = 'nope' is out of range: must be one of 'paper', 'block', "
        "'residual', 'heads', 'mlp-only'"
    )


def test_config_imports_no_model_code():
    """The choices of engine and model keys are read from their modules when checked, so the
    config module (and the CLI that names the sections) loads without torch or TransformerLens."""
    code = (
        "import sys, rl_circuits.config as c\n"
        "c.parse_config({'pairs': ['mistral'], 'datasets': ['gsm8k']}, 'c.toml')\n"
        "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"model": {"dtype": "fp8"}},
            "c.toml: model.dtype = 'fp8' is out of range: must be one of 'float32', 'bfloat16', "
            "'float16', 'float64'",
        ),
        ({"limit": True}, "c.toml: limit must be an int (>= 0), got True"),
        (
            {"generate": {"temperature": "hot"}},
            "c.toml: generate.temperature must be a number (>= 0), got 'hot'",
        ),
        (
            {"grade": {"timeout": float("inf")}},
            "c.toml: grade.timeout = inf must be a finite number (> 0)",
        ),
        ({"attribute": {"checkpoint": 1}}, "c.toml: attribute.checkpoint must be a bool, got 1"),
        ({"select": {"alphas": 0.5}}, "c.toml: select.alphas must be a list, got 0.5"),
        (
            {"circuits": {"colour": 1}},
            "c.toml: circuits.colour is not a known key; allowed: enabled, points, thresholds, "
            "ablation, ranking, rank_by, alphas, batch_size",
        ),
        (
            {"colour": {"x": 1}},
            "c.toml: unknown section [colour]; allowed: run, model, generate, grade, select, "
            "attribute, circuits, diff, analyze",
        ),
        (
            {"diff": {"directions": ["sideways"]}},
            "c.toml: diff.directions = ['sideways'] is out of range: a non-empty list of "
            "'after_into_before', 'before_into_after'",
        ),
        (
            {"diff": {"alphas": [0.7]}},
            "c.toml: diff.alphas = [0.7] is out of range: each entry must be a number among "
            "select.alphas (0.03, 0.1, 0.3, 0.5); [] for all of them",
        ),
        ({"diff": {"method": "magic"}}, "c.toml: diff.method = 'magic' is out of range"),
        ({"diff": {"points": 1}}, "c.toml: diff.points = 1 is out of range: must be >= 2"),
        (
            {"select": {"alphas": [0.5, 0.5000001]}},
            "c.toml: select.alphas = [0.5, 0.5000001] lists alpha 0.5 more than once",
        ),
    ],
)
def test_errors_name_the_key_and_the_range(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, **doc}, "c.toml")
    assert str(info.value).startswith(message)


def test_overrides_replace_keys_and_are_validated():
    plain = load_config(TINY)
    cfg = load_config(TINY, {"select": {"n": 3}, "run": {"limit": 2}, "grade": {"timeout": 9}})
    assert (cfg.select.n, cfg.run.limit, cfg.grade.timeout) == (3, 2, 9)
    # the file's other keys stay, in the overridden section too
    assert cfg.select.beta == plain.select.beta == 0.1 and cfg.run.pairs == ("tiny",)
    changed = {
        f"{name}.{k}"
        for name in SECTIONS
        for k, v in cfg.resolved()[name].items()
        if plain.resolved()[name][k] != v
    }
    assert changed == {"select.n", "run.limit", "grade.timeout"}
    with pytest.raises(ConfigError, match=r"tiny\.toml: select\.n = 1 is out of range: must be"):
        load_config(TINY, {"select": {"n": 1}})


# changes in every kind of key: strings TOML must escape, numbers, lists, booleans
EVERY_KIND = {
    "run": {"run_dir": 'runs/a "quoted"\\path\nwith ünïcode', "limit": 3},
    "generate": {"temperature": 0.7, "seed": -1},
    "select": {"alphas": [0.25, 1], "n": 7},
    "circuits": {"enabled": True, "thresholds": [0.5], "alphas": [1]},
}


@pytest.mark.parametrize("overrides", [None, EVERY_KIND], ids=["file", "overridden"])
@pytest.mark.parametrize("name", ["tiny.toml", "demo.toml", "paper.toml"])
def test_dump_config_reads_back_to_the_same_config(tmp_path, name, overrides):
    cfg = load_config(ROOT / "configs" / name, overrides)
    path = tmp_path / name
    path.write_text(dump_config(cfg))
    back = load_config(path)
    assert back.resolved() == cfg.resolved()
    assert back.pairs == cfg.pairs
    # every pair is written inline: the file does not depend on the registry it was made with
    for pair in cfg.pairs:
        assert tomllib.loads(path.read_text())["pairs_inline"][pair]


def test_dump_config_keeps_every_field_of_a_pair(tmp_path):
    """Optional pair fields (revisions, end markers of both kinds) and an inline pair that
    replaces a registered one of the same name come back as they were."""
    mistral = {
        "before": "local/before",
        "after": "local/after",
        "revision_before": "abc123",
        "algorithm": "PPO",
        "template": "[INST] {q} [/INST]",
        "max_new_tokens": 17,
        "stop": ["</s>", 2],
    }
    from rl_circuits.errors import RLCircuitsWarning

    def replaces():
        return pytest.warns(RLCircuitsWarning, match="replaces the registered pair 'mistral'")

    with replaces():
        cfg = parse_config({**MINIMAL, "pairs_inline": {"mistral": mistral}}, "c.toml")
    assert cfg.pairs["mistral"].revision_before == "abc123"  # not the registry's entry
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    with replaces():
        back = load_config(path)
    assert back.pairs == cfg.pairs and back.resolved() == cfg.resolved()


def test_run_written_before_the_sections_loads_and_plans_unchanged():
    """config.json of a run written by the code before typed sections (fixture) parses back
    to the same resolved config, shows no config change, and every stage and cell keeps its
    fingerprint: the run is neither refused nor recomputed. The one exception is the report's
    own fingerprint, which no longer holds where the run and its data are (LOCATION_KEYS,
    issue 22): the report reruns once, by itself, without --force."""
    from rl_circuits.pipeline.integrity import LOCATION_KEYS, plan
    from rl_circuits.store.canonical import config_diff

    old = json.loads(FIXTURE.read_text())
    stored = old["config"]
    cfg = config_from_resolved(upgrade_resolved(stored), "config.json")
    # sections added since (diff, weights) come at their defaults; all else is as stored
    added = sorted(set(cfg.resolved()) - set(stored))
    assert added == ["diff", "weights"]
    assert all(cfg.resolved()[k] == defaults()[k] for k in added)
    # keys added since to older sections come at their defaults too
    upgraded = upgrade_resolved(stored)
    assert {k: v for k, v in cfg.resolved().items() if k not in added} == {
        k: v for k, v in upgraded.items() if k not in added
    }
    assert config_diff(upgrade_resolved(stored), cfg.resolved()) == []
    got = plan(cfg, old["dataset_hashes"])
    # Stages added since: diff (off, no cells) and weights (on by default: its new cells); the
    # report, which shows them, is redone; every other stage and cell keeps its fingerprint.
    assert set(got) - set(old["fingerprints"]) == set(added)
    assert got["diff"].cells == {}
    fingerprints = {
        stage: {"stage": p.fingerprint, "cells": {k: c.fingerprint for k, c in p.cells.items()}}
        for stage, p in got.items()
        if stage not in added
    }
    report = fingerprints.pop("report")
    assert fingerprints == {k: v for k, v in old["fingerprints"].items() if k != "report"}
    assert any(stored["run"][key.split(".")[1]] for key in LOCATION_KEYS)
    assert report["stage"] != old["fingerprints"]["report"]["stage"]
    # keys at their defaults missing from an older config.json are no change either
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    del older["analyze"]["bins"], older["run"]["ids"]
    back = config_from_resolved(upgrade_resolved(older), "c").resolved()
    assert {k: v for k, v in back.items() if k not in added} == {
        k: v for k, v in upgraded.items() if k not in added
    }
