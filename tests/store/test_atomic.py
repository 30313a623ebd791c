"""Atomic writes: a failed or interrupted write leaves the previous file and no temp file, a
killed writer's temp files are removed on the next exclusive open, and `write_atomic` (used by
the store, the report, the zoo and the demo) writes text, bytes and streamed pieces."""

from __future__ import annotations

import errno
import os

import pytest
from store_support import CONFIG, make_scores, temp_files

from rl_circuits.errors import DataError, StoreError
from rl_circuits.store.atomic import write_atomic
from rl_circuits.store.run import RunStore


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("broken", ["write", "fsync"])
def test_failed_write_keeps_the_original_and_leaves_no_temp_file(tmp_path, monkeypatch, broken):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        store.write_json("sub/result.json", {"v": 1})
        store.write_scores("scores.safetensors", make_scores(2))
        scores_before = (store.root / "scores.safetensors").read_bytes()
        store.records("gen").write_chunk([{"id": "a"}])
        monkeypatch.setattr(os, broken, _enospc)
        attempts = {
            "sub/result.json": lambda: store.write_json("sub/result.json", {"v": 2}),
            "new.txt": lambda: store.write_text("new.txt", "never"),
            "scores.safetensors": lambda: store.write_scores(
                "scores.safetensors", make_scores(2, seed=1)
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


def test_write_atomic_writes_text_bytes_and_pieces_creating_the_folder(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert write_atomic(target, "é\n") == target and target.read_bytes() == "é\n".encode()
    write_atomic(target, b"bytes")
    assert target.read_bytes() == b"bytes"
    block = b"x" * (1 << 20)  # pieces of a block and more are written as they come
    write_atomic(target, iter([b"head", block, memoryview(b"tail")]))
    assert target.read_bytes() == b"head" + block + b"tail"
    assert temp_files(tmp_path) == []


def test_write_atomic_if_changed_leaves_an_equal_file_untouched(tmp_path):
    target = tmp_path / "demo.toml"
    write_atomic(target, "a = 1\n", if_changed=True)
    os.utime(target, ns=(1, 1))
    write_atomic(target, "a = 1\n", if_changed=True)
    assert target.stat().st_mtime_ns == 1  # not rewritten
    write_atomic(target, "a = 2\n", if_changed=True)
    assert target.read_text() == "a = 2\n" and target.stat().st_mtime_ns != 1
    with pytest.raises(TypeError, match="if_changed"):
        write_atomic(target, iter([b"x"]), if_changed=True)


def test_write_atomic_failure_names_the_file_and_keeps_it(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    write_atomic(target, "old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(StoreError, match=f"could not write the report {target}: disk full"):
        write_atomic(target, "new", label=f"the report {target}")
    monkeypatch.undo()
    assert target.read_text() == "old" and temp_files(tmp_path) == []
