"""RunStore: one config per run (named differences, forced changes in the manifest), one
writer or shard workers (locking), read-only access, path confinement and stage markers."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import textwrap

import numpy
import pytest
import torch
from store_support import CONFIG, make_scores, run_python

from rl_circuits.errors import ConfigError, LockedError, StoreError
from rl_circuits.store.run import RunStore

# ------------------------------------------------------------------ config, manifest


def test_config_mismatch_names_each_key_and_keeps_the_stored_config(tmp_path):
    run = tmp_path / "run"
    RunStore.open(run, CONFIG).close()
    stored = (run / "config.json").read_bytes()
    changed = {"model": "rl", "select": {"beta": 0.6, "k": 3.0}, "layers": [1, 2], "seed": 1}
    with pytest.raises(ConfigError) as err:
        RunStore.open(run, changed)
    message = str(err.value)
    assert "select.beta: 0.5 -> 0.6" in message
    assert "select.k: 3 -> 3.0" in message  # 3 and 3.0 serialise (and hash) differently
    assert 'model: "base" -> "rl"' in message
    assert "seed: (absent) -> 1" in message
    assert "layers" not in message  # unchanged keys are not listed
    assert str(run) in message and "--force" in message and "new run directory" in message
    assert (run / "config.json").read_bytes() == stored
    RunStore.open(run, CONFIG).close()  # the lock was released by the failed open


def test_config_json_sorted_and_hashed_in_manifest(tmp_path):
    with RunStore.open(tmp_path / "run", {"b": 1, "a": {"d": 2, "c": 3}}) as store:
        data = (store.root / "config.json").read_bytes()
        assert list(json.loads(data)) == ["a", "b"] and data.index(b'"c"') < data.index(b'"d"')
        manifest = store.manifest()
        assert manifest["config_hash"] == hashlib.sha256(data).hexdigest() == store.config_hash
        assert manifest["environment"]["python"] == platform.python_version()
        assert manifest["environment"]["packages"]["numpy"] == numpy.__version__
        assert manifest["environment"]["packages"]["torch"].startswith(
            torch.__version__.split("+")[0]
        )
        assert manifest["created_at"] and manifest["history"][0]["event"] == "created"


def test_force_overwrites_config_keeps_results_and_records_history(tmp_path):
    run = tmp_path / "run"
    extra = {"models": {"base": {"revision": "r1"}}}
    with RunStore.open(run, CONFIG, manifest_extra=extra) as store:
        store.write_json("grade/summary.json", {"n": 3})
        store.mark_done("grade", {"n": 3})
        old_hash = store.config_hash
    changed = {**CONFIG, "select": {"beta": 0.6, "k": 3}}
    extra2 = {"models": {"rl": {"revision": "r2"}}, "datasets": {"gsm8k": "abc"}}
    with RunStore.open(run, changed, force=True, manifest_extra=extra2) as store:
        assert json.loads((run / "config.json").read_text()) == changed
        assert store.read_json("grade/summary.json") == {"n": 3}  # results kept
        manifest = store.manifest()
        assert manifest["config_hash"] == store.config_hash != old_hash
        event = manifest["history"][-1]
        assert event["event"] == "config_changed"
        assert event["from_hash"] == old_hash and event["to_hash"] == store.config_hash
        assert event["changes"] == ["select.beta: 0.5 -> 0.6"]
        # extras merged across opens, not replaced
        assert manifest["models"] == {"base": {"revision": "r1"}, "rl": {"revision": "r2"}}
        assert manifest["datasets"] == {"gsm8k": "abc"}
        # the marker tells that "grade" ran under the old config
        assert store.stage_info("grade")["config_hash"] == old_hash


def test_manifest_extra_cannot_overwrite_store_keys(tmp_path):
    with pytest.raises(StoreError, match="config_hash"):
        RunStore.open(tmp_path / "run", CONFIG, manifest_extra={"config_hash": "x"})


# ------------------------------------------------------------------ locking


LOCK_CHILD = textwrap.dedent(
    """
    import json, sys
    from rl_circuits.store.run import RunStore
    store = RunStore.open(sys.argv[1], json.loads(sys.argv[2]))
    store.write_json("child.json", {"child": True})
    store.close()
    """
)


def test_second_process_is_refused_while_the_first_is_unharmed(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, CONFIG) as store:
        store.write_json("result.json", {"v": 1})
        before = {name: (run / name).read_bytes() for name in ("config.json", "result.json")}
        child = run_python(LOCK_CHILD, str(run), json.dumps(CONFIG))
        assert child.returncode != 0
        assert "LockedError" in child.stderr
        assert f"run directory {store.root} is locked by process {os.getpid()}" in child.stderr
        assert not (run / "child.json").exists()
        assert {name: (run / name).read_bytes() for name in before} == before
        store.write_json("result.json", {"v": 2})  # the first writer still works
        assert store.read_json("result.json") == {"v": 2}
    child = run_python(LOCK_CHILD, str(run), json.dumps(CONFIG))  # released by close()
    assert child.returncode == 0, child.stderr
    assert json.loads((run / "child.json").read_text()) == {"child": True}


def test_second_open_in_the_same_process_is_refused(tmp_path):
    run = tmp_path / "run"
    store = RunStore.open(run, CONFIG)
    with pytest.raises(LockedError, match=f"this process \\(pid {os.getpid()}\\)"):
        RunStore.open(run, CONFIG)
    store.write_json("still.json", [1])  # the failed open did not drop the first one's lock
    with pytest.raises(LockedError):
        RunStore.open(run, CONFIG)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.write_json("after.json", [1])
    RunStore.open(run, CONFIG).close()


def test_read_only_needs_no_lock_and_refuses_writes(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, CONFIG) as writer:
        writer.write_json("x.json", {"a": 1})
        writer.mark_done("grade", {"n": 1})
        reader = RunStore.read_only(run)  # works while the writer holds the lock
        assert reader.read_json("x.json") == {"a": 1}
        assert reader.config == CONFIG and reader.config_hash == writer.config_hash
        assert reader.stage_done("grade") and reader.stage_info("grade")["info"] == {"n": 1}
        with pytest.raises(StoreError, match="read-only"):
            reader.write_json("y.json", {})
    with pytest.raises(StoreError, match="no run directory"):
        RunStore.read_only(tmp_path / "missing")


# ------------------------------------------------------------------ path confinement


@pytest.mark.parametrize("bad", ["../x.json", "a/../../x.json", "..", "", "."])
def test_relative_escapes_are_refused(tmp_path, bad):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        with pytest.raises(StoreError):
            store.write_json(bad, {})
        assert not (tmp_path / "x.json").exists()


def test_absolute_and_symlinked_escapes_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        with pytest.raises(StoreError, match="absolute"):
            store.write_json(str(outside / "abs.json"), {})
        (store.root / "linkdir").symlink_to(outside)
        (store.root / "link.json").symlink_to(outside / "target.json")
        for rel in ("linkdir/x.json", "link.json"):
            with pytest.raises(StoreError, match="outside the run directory"):
                store.write_json(rel, {"escaped": True})
        with pytest.raises(StoreError):
            store.write_scores("linkdir/s.safetensors", make_scores(1))
        with pytest.raises(StoreError):
            store.records("../evil")
        with pytest.raises(StoreError):
            store.records("linkdir").write_chunk([{"id": "a"}])
        with pytest.raises(StoreError):
            store.read_json("../run/config.json")
        assert os.listdir(outside) == []
        # a symlink that stays inside the run is fine
        (store.root / "inner").mkdir()
        (store.root / "alias").symlink_to(store.root / "inner")
        store.write_json("alias/ok.json", {"ok": True})
        assert json.loads((store.root / "inner" / "ok.json").read_text()) == {"ok": True}


def test_store_files_cannot_be_overwritten_through_the_api(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        for name in ("config.json", "manifest.json", ".lock"):
            with pytest.raises(StoreError, match="managed by the store"):
                store.write_text(name, "x")
        assert store.config == CONFIG


# ------------------------------------------------------------------ stage markers


def test_stage_markers_are_set_read_cleared_and_validated(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        assert not store.stage_done("select") and store.stage_info("select") is None
        store.mark_done("select", {"n_selected": 12})
        assert store.stage_done("select")
        info = store.stage_info("select")
        assert info["info"] == {"n_selected": 12} and info["config_hash"] == store.config_hash
        store.mark_done("attribute/base", {})
        assert store.stage_done("attribute/base") and not store.stage_done("attribute/rl")
        store.clear_done("select")
        assert not store.stage_done("select")
        for bad in ("../x", "/abs", "a/../b", ""):
            with pytest.raises(StoreError, match="invalid stage or record table name"):
                store.mark_done(bad, {})
