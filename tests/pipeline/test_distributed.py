"""Data parallel generate and attribute: shard workers, the launcher, the Ray backend.

Every test compares with one single-process run of the same config: merged files must be
byte-identical. Concurrent shard workers are forked from this process (imports done, fast);
the launcher and Ray start real worker processes. The Ray tests come last in this file, after
the forks (forking a process that runs Ray's threads is unsafe).
"""

import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest
import torch
from config_support import write_config
from fault_support import intercept_writes, score_temp

from rl_circuits.cli.main import main
from rl_circuits.errors import ConfigError, LockedError, StoreError
from rl_circuits.pipeline.distributed import _pump
from rl_circuits.store.run import RunStore

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("datasets", "generate", "grade", "select", "attribute")


# --------------------------------------------------------------------------- the tiny world


class World:
    """The tiny run's models with generate.chunk_size = 2 (6 questions: 3 chunks to share
    out), and a single-process reference run of that config up to the attribute stage."""

    def __init__(self, base: Path, tiny_config: Path):
        self.base = base
        self.ref = base / "ref"
        chunks = {"generate": {"chunk_size": 2}}
        self.config = write_config(base / "sharded.toml", chunks, base=tiny_config)

    def argv(self, stage: str, run_dir: Path, *extra: str) -> list[str]:
        return [stage, str(self.config), "--run-dir", str(run_dir), *extra]

    def run_upto(self, run_dir: Path, last: str) -> Path:
        """Copy the reference's outputs of the stages before `last`'s."""
        run_dir.mkdir(parents=True)
        (run_dir / "stages").mkdir()
        for name in ("config.json", "manifest.json"):
            shutil.copy2(self.ref / name, run_dir / name)
        for stage in STAGES[: STAGES.index(last)]:
            shutil.copytree(self.ref / stage, run_dir / stage)
            shutil.copy2(self.ref / "stages" / f"{stage}.json", run_dir / "stages")
            if (self.ref / "stages" / stage).is_dir():
                shutil.copytree(self.ref / "stages" / stage, run_dir / "stages" / stage)
        return run_dir


@pytest.fixture(scope="module")
def world(tiny_run, tmp_path_factory) -> World:
    base, config = tiny_run
    w = World(tmp_path_factory.mktemp("distributed"), config)
    for stage in STAGES:
        assert main(w.argv(stage, w.ref)) == 0
    return w


def _outputs(run_dir: Path, stage: str) -> dict[str, bytes]:
    """Every file a stage wrote, and its markers without their time."""
    out = {}
    for path in sorted((run_dir / stage).rglob("*")):
        if path.is_file():
            out[path.relative_to(run_dir).as_posix()] = path.read_bytes()
    markers = run_dir / "stages"
    for path in [markers / f"{stage}.json", *sorted((markers / stage).rglob("*.json"))]:
        if path.is_file():
            marker = json.loads(path.read_text())
            marker.pop("completed_at")
            out[path.relative_to(run_dir).as_posix()] = marker
    return out


def _assert_same(run_dir: Path, world: World, stage: str) -> None:
    got, want = _outputs(run_dir, stage), _outputs(world.ref, stage)
    assert sorted(got) == sorted(want)
    assert f"stages/{stage}.json" in want and len(want) > 3
    for rel, data in want.items():
        assert got[rel] == data, rel
    temps = [p for p in run_dir.rglob(".*.tmp-*")]
    assert not temps and not list(run_dir.rglob("chunks"))


# --------------------------------------------------------------------------- forked workers


def _stop_tqdm_monitor() -> None:
    """No thread may hold a lock across fork: tqdm's monitor thread takes tqdm's lock."""
    import tqdm.auto
    import tqdm.std

    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        cls.monitor_interval = 0
        monitor = cls.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None


def _child(argv: list[str], log: Path, patch) -> None:
    out = open(log, "w", buffering=1)  # open until the process exits
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    patch()
    sys.exit(main(argv))


def _fork(argv: list[str], log: Path, patch=lambda: None):
    _stop_tqdm_monitor()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, log, patch))
    proc.start()
    return proc


def _rendezvous(stage: str, mine: Path, other: Path):
    """Patch: the stage starts only once the other worker is inside it too, so both hold
    the shared lock at the same time."""

    def patch():
        import importlib

        pipeline = importlib.import_module(f"rl_circuits.pipeline.{stage}")
        real = getattr(pipeline, f"stage_{stage}")

        def wrapper(*args, **kwargs):
            mine.touch()
            deadline = time.monotonic() + 60
            while not other.exists():
                assert time.monotonic() < deadline, "the other shard worker never started"
                time.sleep(0.01)
            return real(*args, **kwargs)

        setattr(pipeline, f"stage_{stage}", wrapper)

    return patch


def _run_two_shards(world: World, stage: str, run_dir: Path, tmp_path: Path) -> list[str]:
    flags = [tmp_path / f"{stage}-{i}.flag" for i in range(2)]
    logs = [tmp_path / f"{stage}-{i}.log" for i in range(2)]
    procs = [
        _fork(
            world.argv(stage, run_dir, "--shard", f"{i}/2"),
            logs[i],
            _rendezvous(stage, flags[i], flags[1 - i]),
        )
        for i in range(2)
    ]
    for proc, log in zip(procs, logs, strict=True):
        proc.join(120)
        assert proc.exitcode == 0, log.read_text()
    return [log.read_text() for log in logs]


def test_concurrent_shard_workers_merge_to_single_process_bytes(world, tmp_path):
    run_dir = world.run_upto(tmp_path / "run", "generate")
    logs = _run_two_shards(world, "generate", run_dir, tmp_path)
    assert all(f"generate shard {i}/2: done" in log for i, log in enumerate(logs))
    assert sum("generate: done (shards merged)" in log for log in logs) >= 1  # the last one
    _assert_same(run_dir, world, "generate")

    for stage in ("grade", "select"):
        assert main(world.argv(stage, run_dir)) == 0
    logs = _run_two_shards(world, "attribute", run_dir, tmp_path)
    assert sum("attribute: done (shards merged)" in log for log in logs) >= 1
    _assert_same(run_dir, world, "attribute")
    assert main(world.argv("attribute", run_dir, "--shard", "1/2")) == 0  # nothing left to do
    _assert_same(run_dir, world, "attribute")


def test_killed_shard_worker_resumes(world, tmp_path, capsys):
    run_dir = world.run_upto(tmp_path / "run", "attribute")
    flag, log = tmp_path / "flag", tmp_path / "log"
    started: list[Path] = []

    def half_write(path, fd, data, real_write):  # killed half-way through its second score file
        if path not in started:
            started.append(path)
        if len(started) == 2:
            real_write(fd, b"partial")
            flag.touch()
            time.sleep(120)
        return real_write(fd, data)

    proc = _fork(
        world.argv("attribute", run_dir, "--shard", "0/2"),
        log,
        lambda: intercept_writes(score_temp, half_write),
    )
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.is_alive(), log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert len(list(run_dir.glob("attribute/**/q/*.safetensors"))) == 1
    assert len(list(run_dir.glob("attribute/**/q/.*.tmp-*"))) == 1  # the killed write

    capsys.readouterr()
    assert main(world.argv("attribute", run_dir, "--shard", "1/2")) == 0  # the other shard
    out = capsys.readouterr().out
    assert "attribute: merged the finished part" in out  # shard 0's questions are missing
    assert not (run_dir / "stages" / "attribute.json").exists()
    assert not list(run_dir.glob("attribute/**/.*.tmp-*"))  # the merge's exclusive open

    assert main(world.argv("attribute", run_dir, "--shard", "0/2")) == 0  # resumed
    assert "attribute: done (shards merged)" in capsys.readouterr().out
    _assert_same(run_dir, world, "attribute")


# --------------------------------------------------------------------------- the store


def test_shard_workers_share_the_lock_and_exclude_exclusive_stages(tmp_path):
    config = {"a": 1}
    run = tmp_path / "run"
    with pytest.raises(StoreError, match="shard workers join an existing run"):
        RunStore.open(run, config, shard=(0, 2))
    RunStore.open(run, config).close()

    first, second = (RunStore.open(run, config, shard=(i, 2)) for i in range(2))
    assert first.shard == (0, 2) and "shard worker 1/2" in repr(second)
    with pytest.raises(LockedError, match="in use by shard workers") as refused:
        RunStore.open(run, config)
    assert "an exclusive stage cannot run until they end" in str(refused.value)
    # their record chunks get separate names; the merge needs the exclusive lock
    for store, ids in ((first, ["a", "c"]), (second, ["b"]), (first, ["e"])):
        store.records("gen").write_chunk([{"id": i, "by": store.shard[0]} for i in ids])
    assert sorted(p.name for p in (run / "gen" / "chunks").iterdir()) == [
        "s0000-00001.jsonl",
        "s0000-00002.jsonl",
        "s0001-00001.jsonl",
    ]
    for action in (
        lambda: first.records("gen").finalize(["a", "b", "c", "e"]),
        lambda: first.mark_done("gen"),
        lambda: first.update_manifest({"x": 1}),
    ):
        with pytest.raises(StoreError, match="needs the exclusive lock"):
            action()
    with pytest.raises(ConfigError, match="differing keys:\n  a: 1 -> 2"):
        RunStore.open(run, {"a": 2}, shard=(1, 2))
    first.close()
    second.close()

    with RunStore.open(run, config) as store:  # exclusive again: the merge
        store.records("gen").finalize(["a", "b", "c", "e"])
        assert store.records("gen").load()[1] == {"id": "b", "by": 1}
        with pytest.raises(LockedError, match="runs an exclusive stage"):
            RunStore.open(run, config, shard=(0, 2), wait=5)  # waits for merges only
    with pytest.raises(StoreError, match="out of range"):
        RunStore.open(run, config, shard=(2, 2))

    merge = RunStore.open(run, config, merging=True)
    threading.Timer(0.3, merge.close).start()
    start = time.monotonic()
    with RunStore.open(run, config, shard=(0, 2), wait=30) as joined:  # joins after the merge
        assert joined.shard == (0, 2) and time.monotonic() - start >= 0.25


# --------------------------------------------------------------------------- the launcher


def test_worker_output_reaches_any_text_stream(tmp_path, capsys):
    """A stream in memory, a file or stderr (captured here: no name, which `typing.TextIO`
    asks for): each gets every line prefixed, a progress bar's carriage return ending a line."""
    expected = "[worker 0/2] one\n[worker 0/2] two\n[worker 0/2] three\n"
    with (tmp_path / "log.txt").open("w") as file:
        for sink in (io.StringIO(), file, sys.stderr):
            tail = deque(maxlen=2)
            _pump(io.BufferedReader(io.BytesIO(b"one\rtwo\n\nthree")), "[worker 0/2] ", sink, tail)
            assert list(tail) == ["two", "three"]
            if isinstance(sink, io.StringIO):
                assert sink.getvalue() == expected
    assert (tmp_path / "log.txt").read_text() == expected
    assert capsys.readouterr().err == expected


def test_launcher_runs_two_workers_then_merges(world, tmp_path, capsys):
    run_dir = world.run_upto(tmp_path / "run", "generate")
    capsys.readouterr()
    assert main(world.argv("generate", run_dir, "--workers", "2")) == 0
    captured = capsys.readouterr()
    assert "generate: done (2 workers)" in captured.out
    for i in range(2):
        assert f"[worker {i}/2] generate shard {i}/2: done" in captured.err
    _assert_same(run_dir, world, "generate")
    assert main(world.argv("generate", run_dir, "--workers", "2")) == 0  # nothing to do
    assert "generate: done\n" in capsys.readouterr().out


def test_launcher_fails_with_the_workers_error(world, tmp_path, capsys, monkeypatch):
    import subprocess

    run_dir = world.run_upto(tmp_path / "run", "attribute")
    real, held = subprocess.Popen, []

    def lock_then_start(*args, **kwargs):  # an exclusive stage starts before the workers
        if not held:
            config = json.loads((run_dir / "config.json").read_text())
            held.append(RunStore.open(run_dir, config))
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", lock_then_start)
    capsys.readouterr()
    assert main(world.argv("attribute", run_dir, "--workers", "2")) == 2
    err = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert err.startswith("error: attribute worker ")
    assert "failed (exit code 2): run directory" in err
    assert f"is locked by process {os.getpid()}" in err and "runs an exclusive stage" in err
    assert "finished work is saved: run the same command again to resume" in err
    held[0].close()
    assert not list(run_dir.glob("attribute/**/*.safetensors"))


# --------------------------------------------------------------------------- Ray (last)


def test_ray_backend_needs_the_extra(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(world.argv("attribute", tmp_path / "run", "--ray")) == 2
    assert "pip install 'rl-circuits[ray]'" in capsys.readouterr().err


def test_ray_local_instance_maps_shards_to_tasks(world, tmp_path):
    import ray

    from rl_circuits.pipeline.distributed import run_stage_on_ray

    run_dir = world.run_upto(tmp_path / "run", "generate")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = run_stage_on_ray("generate", world.config, run_dir, 2)
        _assert_same(run_dir, world, "generate")
        for stage in ("grade", "select"):
            assert main(world.argv(stage, run_dir)) == 0
        results += run_stage_on_ray("attribute", world.config, run_dir, 2)
        _assert_same(run_dir, world, "attribute")
    finally:
        ray.shutdown()
    assert [r["shard"] for r in results] == ["0/2", "1/2"] * 2
    assert all(r["pid"] != os.getpid() for r in results)  # tasks ran in Ray's workers
