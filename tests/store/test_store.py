"""The run store: config guard, locking, atomic writes, path confinement, resumable record
stages (including a writer SIGKILLed mid-stage) and deterministic safetensors score files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy
import pytest
import torch

from rl_circuits.errors import ConfigError, DataError, LockedError, StoreError
from rl_circuits.store.run_store import RunStore

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"model": "base", "select": {"beta": 0.5, "k": 3}, "layers": [1, 2]}
RECORDS_CODE = textwrap.dedent(
    """
    def make_records():
        return [
            {"id": f"q{i:03d}", "text": "é\\u2028x" * (i % 3), "score": i / 7, "ok": i % 2 == 0}
            for i in range(40)
        ]
    """
)
_namespace: dict = {}
exec(RECORDS_CODE, _namespace)  # the same records in this process and in the child
make_records = _namespace["make_records"]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", code, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def all_names(root: Path) -> list[str]:
    """Every file and directory name under root, hidden ones included."""
    names = []
    for _directory, dirs, files in os.walk(root):
        names += dirs + files
    return names


def temp_files(root: Path) -> list[str]:
    return [name for name in all_names(root) if ".tmp-" in name]


def records_bytes(records: list[dict]) -> bytes:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records]
    return "".join(lines).encode()


def make_scores(n: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        values=torch.randn(n, 3, 4, generator=gen),
        ids=[f"q{seed}-{i}" for i in range(n)],
        upstream=("embed", "a0.h0", "m0"),
        downstream=("a1.h0.q", "a1.h0.k", "m1", "logits"),
        edge_mask=torch.rand(3, 4, generator=gen) > 0.3,
        meta={"metric": "logit_diff", "note": "é", "layers": [0, 1]},
    )


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
    from rl_circuits.store.run_store import RunStore
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


# ------------------------------------------------------------------ atomic writes


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("broken", ["write", "fsync"])
def test_failed_write_keeps_the_original_and_leaves_no_temp_file(tmp_path, monkeypatch, broken):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        store.write_json("sub/result.json", {"v": 1})
        store.write_scores("scores.safetensors", **make_scores(2))
        scores_before = (store.root / "scores.safetensors").read_bytes()
        store.records("gen").write_chunk([{"id": "a"}])
        monkeypatch.setattr(os, broken, _enospc)
        attempts = {
            "sub/result.json": lambda: store.write_json("sub/result.json", {"v": 2}),
            "new.txt": lambda: store.write_text("new.txt", "never"),
            "scores.safetensors": lambda: store.write_scores(
                "scores.safetensors", **make_scores(2, seed=1)
            ),
            "gen/chunks/00002.jsonl": lambda: store.records("gen").write_chunk([{"id": "b"}]),
        }
        for rel, attempt in attempts.items():
            with pytest.raises(StoreError) as err:
                attempt()
            assert f"could not write {rel} in run directory {store.root}" in str(err.value)
            assert "disk full" in str(err.value)
        monkeypatch.undo()
        assert store.read_json("sub/result.json") == {"v": 1}
        assert not store.exists("new.txt")
        assert (store.root / "scores.safetensors").read_bytes() == scores_before
        assert store.records("gen").done_ids() == {"a"}
        assert temp_files(store.root) == []


def test_interrupted_write_leaves_original(tmp_path):
    """A non-OSError in the middle of a streamed write (bad record) is not wrapped, same rules."""
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        store.write_jsonl("data.jsonl", [{"a": 1}])
        with pytest.raises(DataError, match="data.jsonl"):
            store.write_jsonl("data.jsonl", [{"a": 2}, {"a": float("nan")}])
        assert store.read_jsonl("data.jsonl") == [{"a": 1}]
        assert temp_files(store.root) == []


def test_stale_temp_files_are_removed_on_open(tmp_path):
    run = tmp_path / "run"
    RunStore.open(run, CONFIG).close()
    (run / "gen" / "chunks").mkdir(parents=True)
    stale = run / "gen" / "chunks" / ".00001.jsonl.tmp-4242-deadbeef"
    stale.write_text('{"id": "half')
    keep = run / ".hidden-user-file"
    keep.write_text("mine")
    with RunStore.open(run, CONFIG) as store:
        assert not stale.exists() and keep.exists()
        assert store.records("gen").done_ids() == set()


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
            store.write_scores("linkdir/s.safetensors", **make_scores(1))
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


# ------------------------------------------------------------------ record stages


KILL_CHILD = RECORDS_CODE + textwrap.dedent(
    """
    import sys, time
    from rl_circuits.store.run_store import RunStore
    store = RunStore.open(sys.argv[1], {"stage": "generate"})
    stage = store.records("generate")
    records = make_records()
    for start in range(0, len(records), 3):
        stage.write_chunk(records[start:start + 3])
        time.sleep(0.25)
    print("finished", flush=True)
    """
)


def test_killed_stage_resumes_to_a_byte_identical_final_file(tmp_path):
    records = make_records()
    order = [r["id"] for r in reversed(records)]

    with RunStore.open(tmp_path / "single", {"stage": "generate"}) as store:
        stage = store.records("generate")
        stage.write_chunk(records)
        single = stage.finalize(order).read_bytes()
    assert single == records_bytes(list(reversed(records)))

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(run)], env=env, stdout=subprocess.PIPE
    )
    first_chunk = run / "generate" / "chunks" / "00001.jsonl"
    deadline = time.monotonic() + 30
    while not first_chunk.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first_chunk.exists(), "the child never wrote a chunk"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert b"finished" not in child.stdout.read()
    child.stdout.close()

    with RunStore.open(run, {"stage": "generate"}) as store:  # the dead child's lock is gone
        stage = store.records("generate")
        done = stage.done_ids()
        assert 3 <= len(done) < len(records) and len(done) % 3 == 0
        assert done == {r["id"] for r in records[: len(done)]}
        assert not stage.is_done()
        remaining = [r for r in records if r["id"] not in done]
        redone = records[len(done) - 1]  # an already stored record, written again
        stage.write_chunk([redone, *remaining[:5]])
        for start in range(5, len(remaining), 7):
            stage.write_chunk(remaining[start : start + 7])
        assert stage.load() == records  # no duplicates, chunk order
        final = stage.finalize(order)
        assert final.read_bytes() == single
        assert stage.is_done() and stage.load() == list(reversed(records))
        assert stage.done_ids() == {r["id"] for r in records}
        assert not (store.root / "generate" / "chunks").exists()  # chunks removed once done
        info = store.stage_info("generate")["info"]
        assert info["n_records"] == 40
        assert info["sha256"] == hashlib.sha256(single).hexdigest()
        assert temp_files(store.root) == []


def test_duplicate_ids_across_chunks_last_wins(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        stage = store.records("grade")
        stage.write_chunk([{"id": "a", "v": 1}, {"id": "b", "v": 1}])
        stage.write_chunk([{"id": "b", "v": 2}, {"id": "c", "v": 1}])
        assert stage.load() == [{"id": "a", "v": 1}, {"id": "b", "v": 2}, {"id": "c", "v": 1}]
        assert (store.root / "grade" / "chunks" / "00002.jsonl").is_file()
        with pytest.raises(DataError, match="twice in one chunk"):
            stage.write_chunk([{"id": "d"}, {"id": "d"}])
        with pytest.raises(DataError, match="string 'id'"):
            stage.write_chunk([{"v": 1}])
        with pytest.raises(DataError, match="no record"):
            stage.finalize(["a", "b", "c", "zzz"])
        with pytest.raises(DataError, match="more than once"):
            stage.finalize(["a", "b", "b", "c"])
        with pytest.raises(DataError, match="not in the order"):
            stage.finalize(["a", "b"])
        assert not stage.is_done()
        stage.finalize(["c", "a"], allow_extra=True)
        assert store.read_jsonl("grade/records.jsonl") == [{"id": "c", "v": 1}, {"id": "a", "v": 1}]
        with pytest.raises(StoreError, match="already finalised"):
            stage.write_chunk([{"id": "e"}])
        stage.reset()
        assert not stage.is_done() and stage.done_ids() == set()


# ------------------------------------------------------------------ stage markers


def test_stage_markers(tmp_path):
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
            with pytest.raises(StoreError, match="invalid stage name"):
                store.mark_done(bad, {})


# ------------------------------------------------------------------ scores


def test_scores_round_trip_exactly(tmp_path):
    data = make_scores(3)
    data["values"][0, 0, 0] = -0.0
    data["values"][1, 2, 3] = float("inf")
    data["values"][2, 1, 1] = float("nan")
    data["ids"] = ["q-é", "q/2", "q 3"]
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        path = store.write_scores("attribute/base.safetensors", **data)
        back = store.read_scores("attribute/base.safetensors")
    assert path.name == "base.safetensors"
    assert back.values.dtype == torch.float32 and back.edge_mask.dtype == torch.bool
    assert torch.equal(back.values.view(torch.int32), data["values"].view(torch.int32))
    assert torch.equal(back.edge_mask, data["edge_mask"])
    assert back.ids == data["ids"]
    assert back.upstream == data["upstream"] and back.downstream == data["downstream"]
    assert back.meta == data["meta"]


def test_scores_are_validated(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        data = make_scores(2)
        with pytest.raises(DataError, match="float32"):
            store.write_scores("s.safetensors", **{**data, "values": data["values"].double()})
        with pytest.raises(DataError, match="shape"):
            store.write_scores("s.safetensors", **{**data, "ids": ["only-one"]})
        with pytest.raises(DataError, match="edge_mask"):
            store.write_scores("s.safetensors", **{**data, "edge_mask": data["edge_mask"].int()})
        with pytest.raises(DataError, match="duplicates"):
            store.write_scores("s.safetensors", **{**data, "ids": ["a", "a"]})
        with pytest.raises(DataError, match="not one string"):
            store.write_scores("s.safetensors", **{**data, "upstream": "abc"})
        store.write_text("not.safetensors", "garbage")
        with pytest.raises(DataError, match="not.safetensors"):
            store.read_scores("not.safetensors")
        assert not store.exists("s.safetensors")


MERGE_CHILD = textwrap.dedent(
    """
    import sys
    from rl_circuits.store.run_store import RunStore
    with RunStore.open(sys.argv[1], {}) as store:
        store.merge_scores(sys.argv[3:], sys.argv[2], ["q2-0", "q0-0", "q1-0"])
    """
)


def test_merge_stacks_in_order_and_is_byte_identical(tmp_path):
    parts = {seed: make_scores(1, seed=seed) for seed in range(3)}
    for part in parts.values():
        part["edge_mask"] = parts[0]["edge_mask"]
    order = ["q2-0", "q0-0", "q1-0"]
    names = [f"per_question/{seed}.safetensors" for seed in range(3)]
    with RunStore.open(tmp_path / "run", {}) as store:
        for name, part in zip(names, parts.values(), strict=True):
            store.write_scores(name, **part)
        first = store.merge_scores(names, "merged.safetensors", order).read_bytes()
        second = store.merge_scores(names[::-1], "again.safetensors", order).read_bytes()
        merged = store.read_scores("merged.safetensors")
        # merging equals writing the stacked tensor directly
        direct = store.write_scores(
            "direct.safetensors",
            torch.cat([parts[2]["values"], parts[0]["values"], parts[1]["values"]]),
            ids=order,
            upstream=parts[0]["upstream"],
            downstream=parts[0]["downstream"],
            edge_mask=parts[0]["edge_mask"],
            meta=parts[0]["meta"],
        ).read_bytes()
    assert first == second == direct
    assert merged.ids == order
    assert torch.equal(merged.values[0], parts[2]["values"][0])
    assert torch.equal(merged.values[2], parts[1]["values"][0])
    # another process (other hash seeds, fresh safetensors state) writes the same bytes
    child = run_python(MERGE_CHILD, str(tmp_path / "run"), "child.safetensors", *names)
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "run" / "child.safetensors").read_bytes() == first


def test_merge_refuses_inconsistent_inputs(tmp_path):
    with RunStore.open(tmp_path / "run", {}) as store:
        a, b = make_scores(1, seed=0), make_scores(1, seed=1)
        b["edge_mask"] = a["edge_mask"]
        store.write_scores("a.safetensors", **a)
        store.write_scores("b.safetensors", **{**b, "meta": {"metric": "other"}})
        with pytest.raises(DataError, match="meta differs"):
            store.merge_scores(["a.safetensors", "b.safetensors"], "m.safetensors", ["q0-0"])
        with pytest.raises(DataError, match="missing from the order"):
            store.merge_scores(
                ["a.safetensors", "b.safetensors"], "m.safetensors", ["q0-0"], meta={}
            )
        store.merge_scores(
            ["a.safetensors", "b.safetensors"], "m.safetensors", ["q1-0", "q0-0"], meta={"x": 1}
        )
        assert store.read_scores("m.safetensors").meta == {"x": 1}
        store.write_scores("c.safetensors", **{**b, "upstream": ("x", "y", "z")})
        with pytest.raises(DataError, match="node names"):
            store.merge_scores(["a.safetensors", "c.safetensors"], "n.safetensors", ["q0-0"])
        with pytest.raises(DataError, match="in both"):
            store.merge_scores(["a.safetensors", "a.safetensors"], "n.safetensors", ["q0-0"])
        assert not store.exists("n.safetensors")
