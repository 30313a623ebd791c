"""Build (or reuse) the demo's model zoo: data, an SFT base model, its GRPO and DPO children.

`build_zoo` writes, under one folder per config digest (`<home>/zoo/<digest>/`):

    data/toy_math/{train,validation,test}.jsonl   the task (MATH-500 fields)
    sft/  grpo/  dpo/                               Hugging Face checkpoints (safetensors,
                                                    tokenizer, README.md, zoo_card.json)
    logs/{sft,grpo,dpo}.jsonl                       every training step's log entry
    zoo.json                                        manifest, written last

and registers the pairs `toy-grpo` (sft -> grpo) and `toy-dpo` (sft -> dpo) in
`<home>/pairs/toy.toml`. `zoo.json` is written atomically after everything else, so a folder
without it (a killed build) is rebuilt from scratch, never half-used; a folder whose manifest
records another config digest is rebuilt too (a non-empty folder that holds no zoo is
refused, never emptied). The training runs in a subprocess whose numeric environment is
pinned (`numerics.pinned_environment`: AVX2 kernels, MKL's reproducibility mode, `num_threads`
threads, default 1, deterministic algorithms) whatever the caller's shell sets, so every x86
machine with AVX2 builds the same bytes; that environment is part of the folder's digest and
recorded in `zoo.json`.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.errors import StoreError
from rl_circuits.models.pairs import home_dir
from rl_circuits.store.atomic import write_atomic
from rl_circuits.zoo.claims import ALGORITHMS, accuracy_line
from rl_circuits.zoo.config import ZOO_FORMAT, ZooConfig
from rl_circuits.zoo.numerics import apply_in_process, environment_digest, pinned_environment
from rl_circuits.zoo.paired import describe
from rl_circuits.zoo.progress import library_output_off
from rl_circuits.zoo.recipes import RECIPES, train_recipes
from rl_circuits.zoo.tasks import DATASET_NAME

DONE_FILE = "zoo.json"
STARTED_FILE = ".zoo-build"  # written first: marks a folder the zoo may empty and rebuild
PAIRS_FILE = "toy.toml"


@dataclass(frozen=True)
class Zoo:
    """A finished zoo: checkpoint folders, data folder and greedy test accuracies."""

    root: Path
    config: ZooConfig
    data_dir: Path
    sft: Path
    grpo: Path
    dpo: Path
    accuracy: dict[str, float]
    paired: dict[str, dict]
    pairs_file: Path | None = None
    dataset: str = DATASET_NAME

    @property
    def template(self) -> str:
        return self.config.task.template

    @property
    def max_new_tokens(self) -> int:
        return self.config.task.max_new_tokens

    def checkpoint(self, recipe: str) -> Path:
        return {"sft": self.sft, "grpo": self.grpo, "dpo": self.dpo}[recipe]


def zoo_digest(config: ZooConfig, env: dict[str, str]) -> str:
    """The cache digest of a zoo: its config and its pinned numeric environment."""
    text = f"{config.digest()} {environment_digest(env)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_root(config: ZooConfig, num_threads: int = 1, kernels: str | None = None) -> Path:
    env = pinned_environment(num_threads, kernels=kernels)
    return home_dir() / "zoo" / zoo_digest(config, env)


def build_zoo(
    config: ZooConfig | None = None,
    root: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    device: str | torch.device = "cpu",
    num_threads: int = 1,
    kernels: str | None = None,
    register: bool = True,
) -> Zoo:
    """Return the zoo for `config`, building it unless a finished one exists at `root`.

    `root` defaults to `<home>/zoo/<digest of config and pinned environment>/`; `force`
    rebuilds even a finished zoo. Training runs in a subprocess with the pinned environment
    and `num_threads` threads; `kernels` forces another kernel set than the pinned AVX2 one
    (`numerics.KERNEL_SETS`). `register` (re)writes `<home>/pairs/toy.toml` to point at it.
    """
    config = config or ZooConfig()
    env = pinned_environment(num_threads, kernels=kernels)
    root = Path(root) if root is not None else default_root(config, num_threads, kernels)
    with _locked(root):
        zoo = None if force else load_zoo(root, config, env)
        if zoo is None:
            _prepare(config, root)
            manifest = _train_in_subprocess(config, root, env, progress=progress, device=device)
            write_atomic(root / DONE_FILE, json.dumps(manifest, indent=2))
            zoo = load_zoo(root, config, env)
            assert zoo is not None
    if register:
        zoo = dataclasses.replace(zoo, pairs_file=register_pairs(zoo))
    return zoo


def load_zoo(
    root: str | Path, config: ZooConfig | None = None, env: dict[str, str] | None = None
) -> Zoo | None:
    """The finished zoo at `root`, or None if unfinished or built from another config.

    With `config`, a zoo built in another numeric environment than `env` (default: this
    machine's one-thread pinned environment) is None too.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / DONE_FILE).read_text())
        if manifest.get("format") != ZOO_FORMAT:
            return None  # built by another version of this module
        built = ZooConfig.from_dict(manifest["config"])
        accuracy = {recipe: manifest["stages"][recipe]["test_accuracy"] for recipe in RECIPES}
        paired = {recipe: manifest["stages"][recipe]["paired_test"] for recipe in RECIPES[1:]}
        built_env = manifest["environment"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # json.JSONDecodeError is a ValueError
    if config is not None:
        env = pinned_environment() if env is None else env
        if built.digest() != config.digest() or built_env != env:
            return None
    if not all((root / recipe / "model.safetensors").is_file() for recipe in RECIPES):
        return None
    return Zoo(
        root=root,
        config=built,
        data_dir=root / "data",
        sft=root / "sft",
        grpo=root / "grpo",
        dpo=root / "dpo",
        accuracy=accuracy,
        paired=paired,
    )


def summary_lines(zoo: Zoo) -> list[str]:
    """The zoo's greedy test accuracies and each post-training recipe's paired test vs SFT."""
    lines = [accuracy_line(zoo.accuracy, zoo.config.task.test_size)]
    for recipe in RECIPES[1:]:
        lines.append(f"{ALGORITHMS[recipe]} vs SFT: {describe(zoo.paired[recipe])}")
    return lines


def register_pairs(zoo: Zoo) -> Path:
    """Write `<home>/pairs/toy.toml` with `toy-grpo` and `toy-dpo` (atomically)."""
    lines = [
        "# Written by rl_circuits.zoo.build_zoo: the demo zoo's pairs (rewritten on each build).",
        f"# Zoo: {zoo.root}  dataset: {zoo.dataset} (data_dir = {zoo.data_dir})",
        "",
    ]
    for recipe in ("grpo", "dpo"):
        entry = {
            "before": str(zoo.sft.resolve()),
            "after": str(zoo.checkpoint(recipe).resolve()),
            "family": "toy-qwen2",
            "algorithm": ALGORITHMS[recipe],
            "template": zoo.template,
            "max_new_tokens": zoo.max_new_tokens,
        }
        lines.append(f"[pairs.toy-{recipe}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
        lines.append("")
    text = "\n".join(lines)
    tomllib.loads(text)  # never write a file the registry cannot read
    path = home_dir() / "pairs" / PAIRS_FILE
    write_atomic(path, text)
    return path


def _toml_value(value) -> str:
    return str(value) if isinstance(value, int) else json.dumps(value)  # JSON strings are TOML


def _prepare(config: ZooConfig, root: Path) -> None:
    """Empty `root` for a build (only if it holds a zoo or a killed build) and mark it."""
    if root.exists() and any(root.iterdir()):
        if not ((root / DONE_FILE).exists() or (root / STARTED_FILE).exists()):
            raise StoreError(
                f"zoo folder {root} is not empty and holds no zoo; nothing there is changed: "
                "give a new or empty folder (--root, or build_zoo's root)"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / STARTED_FILE).write_text(config.digest() + "\n")


# Exceptions a training subprocess reports that the parent raises as themselves.
_RERAISED = {"ValueError": ValueError, "StoreError": StoreError}


def _train_in_subprocess(
    config: ZooConfig, root: Path, env: dict[str, str], *, progress: bool, device
) -> dict:
    """Run `train_recipes` in a fresh Python whose environment is the pinned `env`; its manifest.

    The child's output is relayed to this process's sys.stdout/sys.stderr (so progress shows
    wherever the caller's output goes); its errors are raised here.
    """
    job = root / ".zoo-job.json"
    result = root / ".zoo-result.json"
    job.write_text(
        json.dumps(
            {
                "config": config.to_dict(),
                "root": str(root),
                "env": env,
                "progress": progress,
                "device": str(device),
                "result": str(result),
            }
        )
    )
    package_parent = str(Path(__file__).resolve().parents[2])
    child_env = {**os.environ, **env}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
    )
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "--job", str(job)],
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    relays = [
        threading.Thread(target=_relay, args=(process.stdout, sys.stdout), daemon=True),
        threading.Thread(target=_relay, args=(process.stderr, sys.stderr), daemon=True),
    ]
    for relay in relays:
        relay.start()
    try:
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        for relay in relays:
            relay.join()
    try:
        outcome = json.loads(result.read_text())
    except (OSError, ValueError):
        raise RuntimeError(
            f"the zoo's training subprocess exited with code {code} without a result; "
            f"its output is above; rerun `rl-circuits zoo build` to start {root} afresh"
        ) from None
    finally:
        job.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
    if "error" in outcome:
        kind = _RERAISED.get(outcome["error"], RuntimeError)
        raise kind(outcome["message"])
    return outcome["manifest"]


_CHILD = "import sys; from rl_circuits.zoo.build import main; sys.exit(main(sys.argv[1:]))"


def _relay(stream, out) -> None:
    """Copy a child's byte stream to a text stream as it comes (progress bars included)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(stream.fileno(), 4096):
        out.write(decoder.decode(chunk))
        out.flush()
    stream.close()


def _run_job(job_path: Path) -> int:
    """The training subprocess: pin torch, build, write the manifest (or the error)."""
    job = json.loads(job_path.read_text())
    apply_in_process(job["env"])
    result = Path(job["result"])
    try:
        config = ZooConfig.from_dict(job["config"])
        with library_output_off():
            manifest = train_recipes(
                config,
                Path(job["root"]),
                job["env"],
                zoo_digest(config, job["env"]),
                progress=job["progress"],
                device=job["device"],
            )
        outcome = {"manifest": manifest}
    except (ValueError, StoreError) as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    write_atomic(result, json.dumps(outcome))
    return 0


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builds of one zoo folder across processes (a lock file beside it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    """`rl-circuits zoo build [--root DIR] [--force] [--reduced] [--quiet] [--device D] ...`."""
    parser = argparse.ArgumentParser(
        prog="rl-circuits zoo build",
        description="Build (or reuse) the demo's SFT/GRPO/DPO model zoo and register its pairs.",
    )
    parser.add_argument("--root", type=Path, help="zoo folder (default <home>/zoo/<digest>)")
    parser.add_argument("--force", action="store_true", help="rebuild even a finished zoo")
    parser.add_argument("--reduced", action="store_true", help="the small test-sized zoo")
    parser.add_argument("--config", type=Path, help="TOML file overriding ZooConfig fields")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-register", action="store_true", help="do not write pairs/toy.toml")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # the training subprocess
    args = parser.parse_args(argv)
    if args.job is not None:
        return _run_job(args.job)
    config = ZooConfig()
    if args.config is not None:
        config = ZooConfig.from_dict(tomllib.loads(args.config.read_text()).get("zoo", {}))
    if args.reduced:
        config = config.reduced()
    zoo = build_zoo(
        config,
        root=args.root,
        force=args.force,
        progress=not args.quiet,
        device=args.device,
        num_threads=args.threads,
        register=not args.no_register,
    )
    print(f"zoo: {zoo.root}")
    print(f"data_dir: {zoo.data_dir} (dataset {zoo.dataset})")
    for recipe in RECIPES:
        print(f"{recipe}: {zoo.checkpoint(recipe)}")
    for line in summary_lines(zoo):
        print(line)
    if zoo.pairs_file is not None:
        print(f"pairs: toy-grpo, toy-dpo registered in {zoo.pairs_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
