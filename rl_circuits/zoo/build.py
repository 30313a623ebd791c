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
import platform
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.errors import StoreError
from rl_circuits.models.pairs import home_dir
from rl_circuits.store.atomic import write_atomic
from rl_circuits.zoo import dpo as dpo_stage
from rl_circuits.zoo import grpo as grpo_stage
from rl_circuits.zoo import sft as sft_stage
from rl_circuits.zoo.claims import ALGORITHMS, accuracy_line
from rl_circuits.zoo.config import ZOO_FORMAT, ZooConfig
from rl_circuits.zoo.model import (
    correct,
    count_parameters,
    init_model,
    load_checkpoint,
    make_tokenizer,
    save_checkpoint,
    sha256_file,
)
from rl_circuits.zoo.numerics import apply_in_process, environment_digest, pinned_environment
from rl_circuits.zoo.paired import describe, mcnemar_exact
from rl_circuits.zoo.progress import library_output_off
from rl_circuits.zoo.tasks import DATASET_NAME, generate_splits, summary, write_splits

STAGES = ("sft", "grpo", "dpo")
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

    def checkpoint(self, stage: str) -> Path:
        return {"sft": self.sft, "grpo": self.grpo, "dpo": self.dpo}[stage]


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
        accuracy = {stage: manifest["stages"][stage]["test_accuracy"] for stage in STAGES}
        paired = {stage: manifest["stages"][stage]["paired_test"] for stage in STAGES[1:]}
        built_env = manifest["environment"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # json.JSONDecodeError is a ValueError
    if config is not None:
        env = pinned_environment() if env is None else env
        if built.digest() != config.digest() or built_env != env:
            return None
    if not all((root / stage / "model.safetensors").is_file() for stage in STAGES):
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
    """The zoo's greedy test accuracies and each post-training stage's paired test vs SFT."""
    lines = [accuracy_line(zoo.accuracy, zoo.config.task.test_size)]
    for stage in STAGES[1:]:
        lines.append(f"{ALGORITHMS[stage]} vs SFT: {describe(zoo.paired[stage])}")
    return lines


def register_pairs(zoo: Zoo) -> Path:
    """Write `<home>/pairs/toy.toml` with `toy-grpo` and `toy-dpo` (atomically)."""
    lines = [
        "# Written by rl_circuits.zoo.build_zoo: the demo zoo's pairs (rewritten on each build).",
        f"# Zoo: {zoo.root}  dataset: {zoo.dataset} (data_dir = {zoo.data_dir})",
        "",
    ]
    for stage in ("grpo", "dpo"):
        entry = {
            "before": str(zoo.sft.resolve()),
            "after": str(zoo.checkpoint(stage).resolve()),
            "family": "toy-qwen2",
            "algorithm": ALGORITHMS[stage],
            "template": zoo.template,
            "max_new_tokens": zoo.max_new_tokens,
        }
        lines.append(f"[pairs.toy-{stage}]")
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
    """Run `_build` in a fresh Python whose environment is the pinned `env`; its manifest.

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
            manifest = _build(
                config,
                Path(job["root"]),
                job["env"],
                progress=job["progress"],
                device=job["device"],
            )
        outcome = {"manifest": manifest}
    except (ValueError, StoreError) as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    write_atomic(result, json.dumps(outcome))
    return 0


def _build(config: ZooConfig, root: Path, env: dict[str, str], *, progress: bool, device) -> dict:
    """Train every stage into the prepared `root`; returns the manifest."""
    started = time.perf_counter()
    task = config.task
    template, budget = task.template, task.max_new_tokens
    log = _logger(progress)

    log("data: generating splits")
    sizes = {"train": task.train_size, "validation": task.validation_size, "test": task.test_size}
    splits = generate_splits(task.seed, sizes, task.max_start, task.max_operand, task.step_weights)
    write_splits(root / "data", splits)
    tokenizer = make_tokenizer()
    longest = max(
        len(tokenizer(p.solution, add_special_tokens=False).input_ids) + 1
        for split in splits.values()
        for p in split
    )
    if longest > budget:
        raise ValueError(f"max_new_tokens={budget} is below the longest solution ({longest})")
    data_card = {name: summary(problems) for name, problems in splits.items()}
    test, val = splits["test"], splits["validation"]

    def answers(model, problems) -> list[bool]:
        return correct(model.to(device), tokenizer, problems, template, budget)

    def evaluate(model, problems) -> float:
        return sum(answers(model, problems)) / len(problems)

    logs = root / "logs"
    stages: dict[str, dict] = {}

    # SFT from scratch
    model = init_model(config.model, tokenizer, config.init_seed).to(device)
    base_test = evaluate(model, test)
    log(f"sft: {count_parameters(model):,} parameters, untrained test accuracy {base_test:.1%}")
    result = sft_stage.train_sft(
        model,
        tokenizer,
        splits["train"],
        val,
        template,
        budget,
        config.sft,
        device=device,
        progress=progress,
        log_path=logs / "sft.jsonl",
    )
    path = save_checkpoint(result.model, tokenizer, root / "sft", budget)
    model, _ = load_checkpoint(path, device)
    sft_correct = answers(model, test)
    stages["sft"] = {
        "algorithm": "SFT",
        "parent": None,
        "settings": dataclasses.asdict(config.sft),
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "history": result.history,
        "train_wall_s": round(result.wall_s, 1),
        "test_accuracy_before": base_test,
        "test_accuracy": sum(sft_correct) / len(test),
        "test_correct": _bits(sft_correct),
        "validation_accuracy": result.val_accuracy,
        "log": "logs/sft.jsonl",
    }
    log(
        f"sft: {result.steps} steps in {result.wall_s:.0f} s ({result.stopped}), validation "
        f"accuracy {result.val_accuracy:.1%}, test {stages['sft']['test_accuracy']:.1%}; "
        f"log {logs / 'sft.jsonl'}"
    )
    sft_test, sft_val = stages["sft"]["test_accuracy"], result.val_accuracy

    def child_card(stage: str, model, settings, out: dict) -> dict:
        """Model-card entries of a stage trained from the SFT checkpoint; logs its summary."""
        hits = answers(model, test)
        card = {
            "parent": "sft",
            "settings": dataclasses.asdict(settings),
            "steps": out["steps"],
            "history": out["history"],
            "train_wall_s": round(out["wall_s"], 1),
            "test_accuracy_before": sft_test,
            "test_accuracy": sum(hits) / len(test),
            "test_correct": _bits(hits),
            "paired_test": mcnemar_exact(sft_correct, hits),
            "validation_accuracy_before": sft_val,
            "validation_accuracy": evaluate(model, val),
            "log": f"logs/{stage}.jsonl",
        }
        log(
            f"{stage}: {out['steps']} steps in {out['wall_s']:.0f} s, validation accuracy "
            f"{sft_val:.1%} -> {card['validation_accuracy']:.1%}, test "
            f"{describe(card['paired_test'])}; log {logs / f'{stage}.jsonl'}"
        )
        return card

    # GRPO from SFT (online: samples from the current policy)
    model, _ = load_checkpoint(root / "sft", device)
    out = grpo_stage.train_grpo(
        model,
        tokenizer,
        splits["train"],
        template,
        budget,
        config.grpo,
        device=device,
        progress=progress,
        log_path=logs / "grpo.jsonl",
    )
    path = save_checkpoint(out["model"], tokenizer, root / "grpo", budget)
    model, _ = load_checkpoint(path, device)
    stages["grpo"] = {"algorithm": "GRPO", **child_card("grpo", model, config.grpo, out)}

    # DPO from SFT (offline: pairs sampled once from the SFT model)
    model, _ = load_checkpoint(root / "sft", device)
    t0 = time.perf_counter()
    pairs, pair_stats = dpo_stage.sample_pairs(
        model, tokenizer, splits["train"], template, budget, config.dpo, progress=progress
    )
    pair_stats["wall_s"] = round(time.perf_counter() - t0, 1)
    log(
        f"dpo: {pair_stats['pairs']} preference pairs from {pair_stats['prompts']} questions "
        f"sampled in {pair_stats['wall_s']:.0f} s"
    )
    out = dpo_stage.train_dpo(
        model,
        tokenizer,
        pairs,
        config.dpo,
        device=device,
        progress=progress,
        log_path=logs / "dpo.jsonl",
    )
    out["wall_s"] += pair_stats["wall_s"]
    path = save_checkpoint(out["model"], tokenizer, root / "dpo", budget)
    with (path / "preference_pairs.jsonl").open("w") as handle:
        for pair in pairs:
            handle.write(json.dumps(dataclasses.asdict(pair)) + "\n")
    model, _ = load_checkpoint(path, device)
    stages["dpo"] = {
        "algorithm": "DPO",
        "recipe": "DPO + NLL on chosen (RPO)" if config.dpo.rpo_alpha > 0 else "plain DPO",
        "loss_type": out["loss_type"],
        "loss_weights": out["loss_weights"],
        "pairs": pair_stats,
        **child_card("dpo", model, config.dpo, out),
    }

    for stage, card in stages.items():
        card["sha256"] = sha256_file(root / stage / "model.safetensors")
    manifest = {
        "format": ZOO_FORMAT,
        "digest": zoo_digest(config, env),
        "config_digest": config.digest(),
        "config": config.to_dict(),
        "dataset": {"name": DATASET_NAME, "data_dir": "data", "splits": data_card},
        "template": template,
        "max_new_tokens": budget,
        "parameters": count_parameters(model),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "environment": env,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "versions": _versions(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.perf_counter() - started, 1),
        "stages": stages,
    }
    for stage in STAGES:
        _write_card(root / stage, stage, manifest)
    log(f"zoo: built in {manifest['wall_s']:.0f} s at {root}")
    return manifest


def _bits(hits: list[bool]) -> str:
    """Per-question correctness as a compact string of 0/1 (test-split order)."""
    return "".join("1" if hit else "0" for hit in hits)


def _write_card(path: Path, stage: str, manifest: dict) -> None:
    """zoo_card.json (everything about this checkpoint) and a human-readable README.md."""
    card = manifest["stages"][stage]
    config = manifest["config"]
    payload = {
        "stage": stage,
        **card,
        "task": config["task"],
        "model": config["model"],
        "init_seed": config["init_seed"],
        "parameters": manifest["parameters"],
        "zoo_digest": manifest["digest"],
        "device": manifest["device"],
        "threads": manifest["threads"],
        "environment": manifest["environment"],
        "versions": manifest["versions"],
        "built_at": manifest["built_at"],
    }
    (path / "zoo_card.json").write_text(json.dumps(payload, indent=2) + "\n")
    before = card["test_accuracy_before"]
    parent = f"`{card['parent']}` checkpoint" if card["parent"] else "random initialisation"
    lines = [
        f"# toy-{stage}: {card['algorithm']} checkpoint of the rl-circuits demo zoo",
        "",
        f"A {manifest['parameters']:,}-parameter `Qwen2ForCausalLM` (character tokenizer), "
        f"trained on CPU from the {parent} on `{DATASET_NAME}`, synthetic one- to three-step "
        "arithmetic word problems whose solutions end in `\\boxed{N}`.",
        "",
        f"- algorithm: {card['algorithm']}"
        + (
            f" ({card['recipe']}, loss {card['loss_type']} x {card['loss_weights']})"
            if "recipe" in card
            else ""
        ),
        f"- prompt template: `{json.dumps(manifest['template'])}`; greedy decoding, at most "
        f"{manifest['max_new_tokens']} new tokens",
        f"- greedy test accuracy: {before:.1%} before -> {card['test_accuracy']:.1%} after "
        f"({config['task']['test_size']} questions, exact integer in the last `\\boxed{{}}`)"
        + (
            f"; paired over the same questions: {describe(card['paired_test'])}"
            if "paired_test" in card
            else ""
        ),
        f"- steps: {card['steps']}; training wall time {card['train_wall_s']} s "
        f"({manifest['threads']} thread(s), {manifest['device']})",
        f"- seeds: data {config['task']['seed']}, init {config['init_seed']}, "
        f"sft {config['sft']['seed']}"
        + (f", {stage} {card['settings']['seed']}" if stage != "sft" else ""),
        f"- weights sha256: `{card['sha256']}`",
        f"- zoo config digest: `{manifest['digest']}`; full settings in `zoo_card.json`",
    ]
    if stage == "dpo":
        pairs = card["pairs"]
        lines.append(
            f"- preference pairs: {pairs['pairs']} (sampled once from the SFT model: "
            f"{pairs['samples']} samples of {pairs['prompts']} training questions, "
            f"sample accuracy {pairs['sample_accuracy']:.3f}); see `preference_pairs.jsonl`"
        )
    if stage == "sft":
        lines.append(
            f"- stopping: {card['stopped']} (best validation accuracy "
            f"{card['validation_accuracy']:.3f} at step {card['best_step']})"
        )
    where = json.dumps(str(path.resolve()))
    lines += [
        "",
        "## Load it",
        "",
        "Plain `transformers` gives the exact tokenizer and model the zoo trained (the",
        "tokenizer adds no `<bos>`; prompt with the template above):",
        "",
        "```python",
        *LOADING_EXAMPLE.format(path=where).splitlines(),
        "```",
    ]
    (path / "README.md").write_text("\n".join(lines) + "\n")


# The model card's loading example (three lines; a test runs it).
LOADING_EXAMPLE = """from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({path})
model = AutoModelForCausalLM.from_pretrained({path})
"""


def _versions() -> dict:
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _logger(progress: bool):
    from tqdm.auto import tqdm

    return tqdm.write if progress else (lambda _msg: None)


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
    for stage in STAGES:
        print(f"{stage}: {zoo.checkpoint(stage)}")
    for line in summary_lines(zoo):
        print(line)
    if zoo.pairs_file is not None:
        print(f"pairs: toy-grpo, toy-dpo registered in {zoo.pairs_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
