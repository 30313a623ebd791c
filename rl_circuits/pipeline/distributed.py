"""Data parallel over questions: shard workers, a launcher for one machine, a Ray backend.

Why: generation and attribution dominate a run and every question is independent, so both
stages split into disjoint slices (`--shard i/n`: every n-th question from i) that run at once,
one per GPU or cluster task, on one run directory. Each worker opens the run store as a shard
worker (shared lock; it only adds per-question outputs and its own record chunks), and one
exclusive merge at the end writes the same finalised records, score files and stage markers as
a single process would, byte for byte. A killed worker loses nothing it finished: running its
shard (or the whole stage) again resumes.

Three ways to run the shards:

* by hand, `rl-circuits attribute CONFIG --shard i/n` in n shells or batch jobs: the last
  worker to finish merges (it takes the exclusive lock, which it gets only when no other
  worker holds the shared one);
* `--workers N` (`run_stage_workers`): N subprocesses of the CLI on this machine, worker i
  pinned to the i-th visible GPU through `CUDA_VISIBLE_DEVICES`, then the merge;
* `--ray [ADDRESS]` (`run_stage_on_ray`): one Ray task per shard (one GPU each when the
  cluster has GPUs), on a filesystem the cluster shares, then the merge on the driver.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rl_circuits.errors import ConfigError, LockedError, RLCircuitsError, StoreError
from rl_circuits.pipeline.registry import Stage, get_stage
from rl_circuits.store.layout import check_shard

if TYPE_CHECKING:
    from rl_circuits.config import RunConfig

MERGE_WAIT = 600.0  # seconds a starting shard worker waits for a finished one's merge
STOP_GRACE = 30.0  # seconds stopped workers get to exit on SIGINT before SIGKILL
TAIL_LINES = 40


class WorkerError(RLCircuitsError):
    """A shard worker (subprocess or Ray task) failed; the message carries its error."""


# --------------------------------------------------------------------------- one shard


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise ConfigError(f"--shard {text!r} must be i/n with 0 <= i < n, e.g. 0/4")
    shard = int(match.group(1)), int(match.group(2))
    return check_shard(shard, what=f"--shard {text!r} as", error=ConfigError)


def _sharded(stage: str) -> Stage:
    return get_stage(stage, sharded=True)


def _run_dir(cfg: RunConfig, run_dir: str | os.PathLike[str] | None) -> Path:
    from rl_circuits.pipeline.common import run_root

    return run_root(cfg, run_dir).absolute()


def run_shard(
    stage: str,
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None,
    shard: tuple[int, int],
    *,
    progress: bool = True,
    wait: float = MERGE_WAIT,
) -> None:
    """Shard worker: the stage's slice `shard` in a store opened as shard worker (shared lock).

    Merges nothing; see `merge_finished`. Waits up to `wait` seconds if another worker is
    merging when this one starts.
    """
    from rl_circuits.config import load_config
    from rl_circuits.store.run import RunStore

    spec = _sharded(stage)
    cfg = load_config(config_path)
    root = _run_dir(cfg, run_dir)
    with RunStore.open(root, cfg.resolved(), shard=shard, wait=wait) as store:
        spec.run(cfg, store, progress=progress, shard=shard)  # torch: after the cheap checks


def merge_finished(
    stage: str, config_path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None
) -> bool | None:
    """Merge what the shard workers of `stage` finished, if no worker still runs.

    Returns None when the lock is held (other workers still run: the last one to finish
    merges), False when it merged some of the stage (some shards' questions are missing), True
    when the stage is complete and marked done.
    """
    from rl_circuits.config import load_config
    from rl_circuits.pipeline.integrity import open_run

    spec = _sharded(stage)
    cfg = load_config(config_path)
    try:
        store, _ = open_run(_run_dir(cfg, run_dir), cfg, merging=True)
    except LockedError:
        return None
    with store:
        return spec.merge(cfg, store)


def _prepare(
    stage: str,
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None,
    force: bool,
) -> tuple[RunConfig, Path, bool]:
    """Before starting workers: install (or check) the config with the exclusive lock, clean
    up after killed writers, and check the earlier stage ran. -> (config, run dir, done)."""
    from rl_circuits.config import load_config
    from rl_circuits.pipeline.integrity import iter_missing, open_run, stage_current

    _sharded(stage)
    cfg = load_config(config_path)
    root = _run_dir(cfg, run_dir)
    store, _ = open_run(root, cfg, force=force)
    with store:
        if stage_current(store, stage):
            return cfg, root, True
        missing = list(iter_missing(store, stage))
        if missing:
            raise StoreError(
                f"the {stage} stage needs the {', '.join(missing)} stage of run directory "
                f"{root} first: rl-circuits {missing[0]} {config_path} (or rl-circuits run "
                f"{config_path})"
            )
    return cfg, root, False


def _merge_after_workers(stage: str, cfg: RunConfig, root: Path) -> None:
    """The exclusive merge once every worker has ended; all their work must be there."""
    from rl_circuits.pipeline.integrity import open_run

    store, _ = open_run(root, cfg, merging=True)
    with store:
        if not _sharded(stage).merge(cfg, store):
            raise WorkerError(
                f"every {stage} worker ended without error but some questions have no output "
                f"in {root}; run the same command again to do the rest"
            )


# --------------------------------------------------------------------------- local launcher


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries (indices or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = []
        for entry in (e.strip() for e in listed.split(",")):
            if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
                break
            gpus.append(entry)
        return gpus
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Worker:
    """One shard subprocess, its output pump, and the last lines it printed."""

    shard: tuple[int, int]
    proc: subprocess.Popen
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pump: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"worker {self.shard[0]}/{self.shard[1]}"

    def error(self) -> str:
        """Its `error: ...` line (the CLI's one-line message), else its last line."""
        lines = list(self.tail)
        for line in reversed(lines):
            if line.startswith("error: "):
                return line.removeprefix("error: ")
        return lines[-1] if lines else "(no output)"


@runtime_checkable
class TextSink(Protocol):
    """Where workers' output goes: what `_pump` calls, so any text stream (a file, sys.stderr,
    io.StringIO, a captured stream without a name, which `typing.TextIO` refuses)."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


def _pump(stream, prefix: str, sink: TextSink, tail: deque[str]) -> None:
    """Copy a worker's output to `sink` line by line (progress bars' carriage returns end a
    line too), each line prefixed with the worker's name; keep the last lines for errors."""
    pending = b""
    while chunk := stream.read1(65536):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                sink.write(f"{prefix}{line}\n")
                sink.flush()
    line = pending.decode(errors="replace").rstrip()
    if line:
        tail.append(line)
        sink.write(f"{prefix}{line}\n")
        sink.flush()
    stream.close()


def _stop(workers: list[_Worker], *, interrupted: bool = False) -> None:
    """Interrupt running workers (they save finished work and exit), kill any that hang.

    After Ctrl-C the terminal has interrupted them already: they get a moment to exit before
    a second SIGINT, which would cut their own clean exit short."""
    if interrupted:
        deadline = time.monotonic() + 5.0
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for worker in workers:
        try:
            worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()


def run_stage_workers(
    stage: str,
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    *,
    force: bool = False,
    log: TextSink | None = None,
) -> int:
    """Run a sharded `stage` (`SHARDED_STAGES`) in N worker processes, then merge.

    Worker i runs `rl-circuits STAGE CONFIG --shard i/N` with `CUDA_VISIBLE_DEVICES` set to
    the i-th visible GPUs (as many as `Stage.devices_per_shard`: `model.n_devices` for
    attribution) when GPUs exist. N defaults to the number of visible GPUs divided by that
    number, 1 on CPU. Their output goes to `log` (default stderr), each line prefixed with the
    worker's name. If a worker fails, the others are interrupted (finished work is kept) and
    `WorkerError` carries the failed worker's error. Returns N (0 if the stage was already done).
    """
    cfg, root, done = _prepare(stage, config_path, run_dir, force)
    if done:
        return 0
    from rl_circuits.pipeline.common import device_of

    per = _sharded(stage).devices_per_shard(cfg)
    gpus = [] if device_of(cfg) == "cpu" else visible_gpus()
    count = n_workers or (max(1, len(gpus) // per) if gpus else 1)
    if count < 1:
        raise ConfigError(f"--workers must be at least 1, got {count}")
    sink = log if log is not None else sys.stderr
    env = {**os.environ, "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "10")}
    workers: list[_Worker] = []
    try:
        for index in range(count):
            if gpus:
                mine = [gpus[(index * per + j) % len(gpus)] for j in range(per)]
                env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(mine)}
            command = [
                sys.executable,
                "-m",
                "rl_circuits.cli.main",
                stage,
                str(Path(config_path).absolute()),
                "--run-dir",
                str(root),
                "--shard",
                f"{index}/{count}",
                "--no-merge",
            ]
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            worker = _Worker((index, count), proc)
            worker.pump = threading.Thread(
                target=_pump,
                args=(proc.stdout, f"[{worker.name}] ", sink, worker.tail),
                daemon=True,
            )
            worker.pump.start()
            workers.append(worker)
        failed = _wait_all(workers)
    except BaseException as exc:  # Ctrl-C or a failed start: no worker outlives the launcher
        _stop(workers, interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        for worker in workers:
            if worker.pump is not None:
                worker.pump.join(5)
    if failed is not None:
        raise WorkerError(
            f"{stage} {failed.name} failed (exit code {failed.proc.returncode}): "
            f"{failed.error().rstrip('.')}. The other workers were stopped; finished work is "
            "saved: run the same command again to resume."
        )
    _merge_after_workers(stage, cfg, root)
    return count


def _wait_all(workers: list[_Worker]) -> _Worker | None:
    """Wait for every worker; on the first failure stop the rest and return the failed one."""
    running = list(workers)
    while running:
        for worker in list(running):
            code = worker.proc.poll()
            if code is None:
                continue
            running.remove(worker)
            if code != 0:
                _stop(running)
                return worker
        time.sleep(0.1)
    return None


# --------------------------------------------------------------------------- Ray


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "the Ray backend needs Ray: pip install 'rl-circuits[ray]' (on the driver and on "
            "every node of the cluster)"
        ) from exc
    return ray


def _shard_task(
    stage: str, config_path: str, run_dir: str, index: int, count: int, cwd: str
) -> dict[str, Any]:
    """Body of one Ray task: shard `index`/`count` of `stage`, in the driver's working
    directory when the node has it (relative paths in the config resolve as on the driver)."""
    import torch

    torch.set_num_threads(int(os.environ.get("RL_CIRCUITS_THREADS", "1")))
    start = time.monotonic()
    where = contextlib.chdir(cwd) if os.path.isdir(cwd) else contextlib.nullcontext()
    with where:
        run_shard(stage, config_path, run_dir, (index, count), progress=False)
    return {
        "shard": f"{index}/{count}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.monotonic() - start, 3),
    }


def _task_error(ray, exc: BaseException, stage: str, shard: str) -> WorkerError:
    """A Ray failure as a WorkerError: the task's own message when it raised ours."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RLCircuitsError):
        detail = str(cause)
    elif isinstance(exc, ray.exceptions.RayTaskError):
        detail = str(exc)  # a bug: keep the remote traceback
    else:  # the worker process or its node died, the task was cancelled, ...
        detail = f"{type(exc).__name__}: {exc}"
    return WorkerError(
        f"{stage} Ray task for shard {shard} failed: {detail.rstrip('.')}. The other tasks were "
        "cancelled; finished work is saved: run the same command again to resume."
    )


def run_stage_on_ray(
    stage: str,
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None,
    n_tasks: int | None = None,
    address: str | None = None,
    *,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Map shards i/n of a sharded `stage` (`SHARDED_STAGES`) to Ray tasks, then merge.

    Each task opens the run store as shard worker i of n, so the run directory, the config
    and the models must be on a filesystem every node shares, at the same paths, and
    rl-circuits installed on every node. Tasks ask for `Stage.devices_per_shard` GPUs each
    (`model.n_devices` for attribution) when the cluster has GPUs, else one CPU. `n_tasks`
    defaults to the number of such GPU slots (1 without GPUs). Ray is used as found when this
    process already called `ray.init`; otherwise `ray.init(address)` connects to `address`
    ("auto", "ray://host:port") or, with None, starts a local instance, and disconnects at the
    end. Returns one summary per task (shard, host, pid, seconds); [] if the stage was already
    done.
    """
    ray = _import_ray()
    cfg, root, done = _prepare(stage, config_path, run_dir, force)
    if done:
        return []
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address)
    elif started:  # a local instance, for this command only
        ray.init(include_dashboard=False)
    try:
        per = _sharded(stage).devices_per_shard(cfg)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = n_tasks or (max(1, gpus // per) if gpus else 1)
        if count < 1:
            raise ConfigError(f"the number of Ray tasks must be at least 1, got {count}")
        options = {"num_gpus": per} if gpus else {"num_cpus": 1}
        task = ray.remote(_shard_task).options(**options)
        config = str(Path(config_path).absolute())
        refs = {
            task.remote(stage, config, str(root), i, count, os.getcwd()): f"{i}/{count}"
            for i in range(count)
        }
        results, pending = [], list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                results.append(ray.get(ready))
            except Exception as exc:
                for ref in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                raise _task_error(ray, exc, stage, refs[ready]) from None
    finally:
        if started:
            ray.shutdown()
    _merge_after_workers(stage, cfg, root)
    return sorted(results, key=lambda r: int(r["shard"].split("/")[0]))
