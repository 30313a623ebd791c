"""Record stages: a writer SIGKILLed mid-stage resumes to a byte-identical final file, the last
write of an id wins, and finalising checks the order names every record exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from checker import unchecked
from store_support import CONFIG, REPO, temp_files

from rl_circuits.errors import DataError, StoreError
from rl_circuits.store.run import RunStore

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


def records_bytes(records: list[dict]) -> bytes:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records]
    return "".join(lines).encode()


KILL_CHILD = RECORDS_CODE + textwrap.dedent(
    """
    import sys, time
    from rl_circuits.store.run import RunStore
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


def test_a_record_that_is_not_json_names_its_id_and_writes_nothing(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        stage = store.records("grade")
        with pytest.raises(
            DataError, match="record table 'grade': record 'b' cannot be stored as JSON"
        ):
            stage.write_chunk([{"id": "a"}, {"id": "b", "v": float("nan")}])
        with pytest.raises(DataError, match="records must be dicts"), unchecked():  # not the hint
            stage.write_chunk([["a"]])
        assert stage.done_ids() == set()
