"""One stage registry, one run layout: every file of a finished run is named by `RunLayout`,
stages refuse what they cannot do, and a shard is validated in one place."""

import re
from pathlib import Path

import pytest
from config_support import TINY

from rl_circuits.config import load_config
from rl_circuits.errors import ConfigError, StoreError
from rl_circuits.models.pairs import ROLES, Pair, PairModel, pair_models
from rl_circuits.pipeline.cells import Cell, PlanInputs, StagePlan, digest
from rl_circuits.pipeline.common import circuit_alphas
from rl_circuits.pipeline.distributed import parse_shard
from rl_circuits.pipeline.integrity import Changes, compare_plans, plan
from rl_circuits.pipeline.registry import STAGE_NAMES, STAGES, Stage, get_stage, upstream_of
from rl_circuits.store.layout import RunLayout, check_shard
from rl_circuits.store.run import RunStore


def test_every_file_of_a_run_is_named_by_the_layout(tiny_run):
    base, config = tiny_run
    cfg, root = load_config(config), base / "run"
    datasets = cfg.run.datasets
    named = {RunLayout.LOCK, RunLayout.CONFIG, RunLayout.MANIFEST}
    named |= {RunLayout.marker(stage) for stage in STAGE_NAMES}
    named |= {RunLayout.dataset(d) for d in datasets}
    named |= {RunLayout.COMPARE, RunLayout.OUTPUT_ENTROPY, RunLayout.SKIPPED_CELLS}
    named |= {RunLayout.TABLE1_MD, RunLayout.TABLE1_TEX, RunLayout.REPORT_HTML}
    if cfg.circuits.enabled:
        named.add(RunLayout.CIRCUIT_CURVES)
    records = [
        where(model.key, d)
        for model in pair_models(cfg.pairs.values())
        for d in datasets
        for where in (RunLayout.generations, RunLayout.grades)
    ]
    named |= {RunLayout.records_file(r) for r in records} | {RunLayout.marker(r) for r in records}
    store = RunStore.read_only(root)
    for pair in cfg.pairs:
        if cfg.weights.enabled:
            named.add(RunLayout.weights(pair))
        for d in datasets:
            named.add(RunLayout.selection(pair, d))
            selected = store.read_json(RunLayout.selection(pair, d))["ids"]
            for role in ROLES:
                for alpha in cfg.alphas:
                    named |= {
                        RunLayout.skipped(pair, role, d, alpha),
                        RunLayout.scores(pair, role, d, alpha),
                    }
                    named |= {RunLayout.question_scores(pair, role, d, alpha, q) for q in selected}
                named.add(RunLayout.graph_view(pair, role, d, max(cfg.alphas)))
                if cfg.circuits.enabled:
                    named |= {RunLayout.circuit(pair, role, d, a) for a in circuit_alphas(cfg)}
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    pngs = {f for f in files if re.fullmatch(re.escape(RunLayout.report_png("")) + r"[^/]+", f)}
    assert files - pngs <= named, sorted(files - pngs - named)
    # what the reader opens is there: every cell's merged scores and the tables
    assert {RunLayout.TABLE1_MD, RunLayout.COMPARE, RunLayout.REPORT_HTML} <= files
    assert any(
        RunLayout.scores(p, "before", d, a) in files
        for p in cfg.pairs
        for d in datasets
        for a in cfg.alphas
    )


def test_the_layout_keeps_the_run_directory_format():
    """Runs written before the layout existed load after it: the paths are these strings."""
    assert RunLayout.attribution("p", "before", "math", 0.5) == "attribute/p/before/math/alpha-0.5"
    assert RunLayout.question_scores("p", "after", "math", 1.0, "math-3") == (
        "attribute/p/after/math/alpha-1/q/math-3.safetensors"
    )
    assert RunLayout.circuit("p", "after", "math", 0.3) == "circuits/p/after/math/alpha-0.3.json"
    assert RunLayout.selection("p", "math") == "select/p/math.json"
    assert RunLayout.generations("m-1234", "math") == "generate/m-1234/math"
    assert RunLayout.record_chunk("grade/m/math", 1, 2) == "grade/m/math/chunks/s0001-00002.jsonl"
    assert RunLayout.record_chunk("grade/m/math", None, 2) == "grade/m/math/chunks/00002.jsonl"
    assert RunLayout.marker("attribute") == "stages/attribute.json"
    assert RunLayout.weights("p") == "weights/p.json"


def test_stages_are_declared_once_and_refuse_what_they_cannot_do(tmp_path):
    assert list(STAGES) == list(STAGE_NAMES)
    with pytest.raises(ConfigError, match="unknown stage 'nope'; the stages: datasets, generate"):
        get_stage("nope")
    with pytest.raises(
        ConfigError, match="stage 'grade' does not run in shards; sharded: generate, attribute"
    ):
        get_stage("grade", sharded=True)
    with pytest.raises(ConfigError, match="stage 'select' does not run in shards"):
        STAGES["select"].run(None, None, shard=(0, 2))
    with pytest.raises(ConfigError, match="stage 'report' does not run in shards"):
        STAGES["report"].merge(None, None)


def test_each_stage_names_its_code_and_what_a_shard_needs():
    cfg = load_config(TINY, {"model": {"n_devices": 3}})
    for stage in STAGES.values():
        code = stage.load()  # every "module:function" string names a function
        assert callable(code.run) and (code.merge is not None) == stage.sharded
    assert STAGES["attribute"].devices_per_shard(cfg) == 3  # a model split over 3 GPUs
    assert STAGES["generate"].devices_per_shard(cfg) == 1
    assert upstream_of("attribute") == ("datasets", "generate", "grade", "select")
    assert upstream_of("report") == tuple(s for s in STAGE_NAMES if s != "report")


class _Finished(RunStore):
    """A run store (read-only, no directory) in which every output exists and every stage is
    done."""

    def __init__(self) -> None:
        super().__init__(Path("unused"), lock_fd=None, config_bytes=None)

    def exists(self, rel: str) -> bool:
        return True

    def stage_done(self, name: str) -> bool:
        return True


def test_a_new_stage_is_planned_from_its_declaration_alone(monkeypatch):
    """A stage added to the registry gets cells, fingerprints and recomputation without any
    change to the integrity checks: its plan sees the plans of the stages it reads."""
    seen = []

    def plan_summary(cfg, given: PlanInputs) -> StagePlan:
        seen.append(set(given.upstream))
        stage = StagePlan()
        for key, cell in given.upstream["select"].cells.items():
            stage.cells[f"summary/{key}.json"] = Cell(digest([cell.fingerprint]), (key,))
        stage.fingerprint = digest(["summary", given.values, *given.fingerprints(("select",))])
        return stage

    summary = Stage(
        "summary",
        keys=("select.n",),
        requires=("select",),
        cells="pair x dataset",
        plan=plan_summary,
        function="rl_circuits.pipeline.select:stage_select",
        summary="a stage that exists only in this test",
    )
    cfg = load_config(TINY)
    before = plan(cfg, {})
    monkeypatch.setitem(STAGES, "summary", summary)
    old = plan(cfg, {})
    assert seen == [{"datasets", "generate", "grade", "select"}]
    assert {k: v for k, v in old.items() if k != "summary"} == before  # the others: unchanged
    assert list(old["summary"].cells) == ["summary/tiny/sevens.json"]
    new = plan(load_config(TINY, {"select": {"n": 3}}), {})
    changes = compare_plans(old, new, _Finished())
    assert changes.stale["summary"] == ["summary/tiny/sevens.json"]
    assert "summary" in changes.stages and "generate" not in changes.stages
    assert compare_plans(old, plan(cfg, {}), _Finished()) == Changes()


def test_a_shard_is_validated_once():
    assert check_shard((1, 3)) == (1, 3)
    for bad in ((3, 3), (-1, 2), (True, 2), (0.0, 2)):
        with pytest.raises(StoreError, match="out of range: need integers 0 <= i < n"):
            check_shard(bad)
    with pytest.raises(StoreError, match="must be a pair"):
        check_shard("0/2")
    with pytest.raises(ConfigError, match="out of range"):
        check_shard((2, 2), error=ConfigError)
    assert parse_shard(" 1 / 4 ") == (1, 4)
    with pytest.raises(ConfigError, match=r"--shard '4/4' as \(4, 4\) is out of range"):
        parse_shard("4/4")
    with pytest.raises(ConfigError, match="must be i/n"):
        parse_shard("1-4")


def test_pair_models_share_a_model_between_pairs():
    common = dict(algorithm="GRPO", template="Q: {q}\nA:", max_new_tokens=8)
    one = Pair(name="one", before="org/base", after="org/grpo", **common)
    two = Pair(name="two", before="org/base", after="org/dpo", **common)
    models = list(pair_models([one, two]))
    assert [(m.pair.name, m.role) for m in models] == [
        ("one", "before"),
        ("one", "after"),
        ("two", "after"),
    ]
    assert PairModel(two, "before").key == models[0].key and models[1].path == "org/grpo"
