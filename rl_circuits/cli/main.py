"""The `rl-circuits` command: one subcommand per pipeline stage, `run` to chain them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from rl_circuits.cli.demo import DEFAULT_SUBSET
from rl_circuits.data.selection import SUBSETS
from rl_circuits.pipeline.registry import SHARDED_STAGES, STAGE_NAMES, STAGES

RESUME_NOTE = " Finished work is kept: a stopped command resumes where it stopped."
FORCE_HELP = (
    "accept a changed config or data file: delete the outputs it makes stale and recompute "
    "them (a directory that is not a run is refused even so)"
)
CHECK_PROMPT = "Natalia sold clips to 48 of her friends in April. 48 / 2 = 24. \\boxed{72}"
# check-model's bound on max |logit difference| / max |logit| per dtype, against Hugging Face in
# float32 (float64 for float64). Measured (CPU, the prompt above): SmolLM2-135M (30 layers)
# 8.7e-7 in float64 (Hugging Face keeps rotary in float32), 3.6e-6 in float32, 6.1e-2 in
# bfloat16; the zoo's SFT model 1.1e-6, 1.8e-6, 9.6e-3. A conversion error moves logits by
# O(1) of their scale; each bound leaves a margin of about 4x for deeper models.
CHECK_TOLERANCES = {"float64": 1e-5, "float32": 1e-4, "bfloat16": 0.25}


def _threads() -> None:
    """One torch thread unless the user asks otherwise: two on a busy 2-core box run 30x slower.

    Without importing torch (seconds), so that a command with nothing to compute answers at
    once: torch reads OMP_NUM_THREADS when it is first imported."""
    from rl_circuits.errors import ConfigError

    text = os.environ.get("RL_CIRCUITS_THREADS", "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(
            f"RL_CIRCUITS_THREADS={text!r} must be a whole number of torch threads >= 1 "
            "(e.g. RL_CIRCUITS_THREADS=2)"
        )
    if "torch" in sys.modules:  # imported already (tests, notebooks): set it directly
        sys.modules["torch"].set_num_threads(int(text))
    else:
        os.environ["OMP_NUM_THREADS"] = str(int(text))


def cmd_check_model(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from rl_circuits.engine.graph import GRAPHS, build_graph
    from rl_circuits.models.checkpoints import load_tokenizer, resolve
    from rl_circuits.models.loading import load_model, tokenizer_size_note

    dtype = getattr(torch, args.dtype)
    ckpt = resolve(args.path, args.revision)
    model = load_model(args.path, revision=args.revision, dtype=dtype, device=args.device)
    note = tokenizer_size_note(len(model.tokenizer), model.cfg.d_vocab)
    if note:
        print(f"warning: {ckpt.path}: {note}", file=sys.stderr)
    # The reference: Hugging Face's plain (eager) attention in float32 (float64 for float64), so
    # a bfloat16 check measures the converted model's distance from the checkpoint's function
    # (its fused CPU kernels also refuse bfloat16 under some forced ATen capabilities).
    reference_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(
        str(ckpt.path), dtype=reference_dtype, use_safetensors=True, attn_implementation="eager"
    )
    hf.to(args.device)
    tokens = load_tokenizer(ckpt.path)(CHECK_PROMPT, return_tensors="pt").input_ids
    tokens = tokens.to(args.device)
    with torch.no_grad():
        reference = hf(tokens).logits
        diff = (model(tokens) - reference).abs().max().item()
    scale = reference.abs().max().item()
    relative = diff / scale if scale > 0 else float("inf")
    print(f"checkpoint: {ckpt.path} ({ckpt.architecture}, {model.cfg.n_layers} layers)")
    print(
        f"max |logit difference| of {args.dtype} vs Hugging Face "
        f"({str(reference_dtype).removeprefix('torch.')}, {tokens.shape[1]} tokens): "
        f"{diff:.3e}, {relative:.2e} of the largest |logit| ({scale:.3e})"
    )
    for name in GRAPHS:
        graph = build_graph(name, model.cfg.n_layers, model.cfg.n_heads)
        print(
            f"graph {name!r}: {len(graph.upstream)} upstream x {len(graph.downstream)} "
            f"downstream nodes, {graph.n_edges} edges"
        )
    tolerance = CHECK_TOLERANCES[args.dtype] if args.tolerance is None else args.tolerance
    which = f"the {args.dtype} tolerance" if args.tolerance is None else "the given tolerance"
    if relative <= tolerance:
        print(
            f"PASS: logit difference {relative:.2e} of the largest |logit| <= {which} {tolerance:g}"
        )
        return 0
    print(
        f"FAIL: logit difference {relative:.2e} of the largest |logit| > {which} {tolerance:g}: "
        "TransformerLens does not compute what Hugging Face does for this checkpoint; check the "
        "architecture's map in model_maps/"
    )
    return 1


def cmd_stage(args) -> int:
    if getattr(args, "ray", None) is not None and args.shard:
        print(
            "error: --ray runs every shard itself; it cannot be used with --shard", file=sys.stderr
        )
        return 2
    _prepare_tiny_models(args.config)
    if getattr(args, "ray", None) is not None:
        return cmd_ray(args)
    if getattr(args, "workers", None) is not None:
        return cmd_workers(args)
    if getattr(args, "shard", None):
        return cmd_shard(args)
    from rl_circuits.pipeline.run import run_pipeline

    stage = None if args.command == "run" else args.command
    run_pipeline(args.config, stage=stage, run_dir=args.run_dir, force=args.force)
    return 0


def cmd_shard(args) -> int:
    """One shard worker (shared lock); then, if no other worker runs, the merge."""
    from rl_circuits.pipeline.distributed import merge_finished, parse_shard, run_shard

    if args.force:
        print(
            "error: --force cannot be used with --shard: shard workers never change the "
            "stored config; run the stage once without --shard --force first",
            file=sys.stderr,
        )
        return 2
    index, count = parse_shard(args.shard)
    run_shard(args.command, args.config, args.run_dir, (index, count))
    print(f"{args.command} shard {index}/{count}: done")
    if args.no_merge:
        return 0
    merged = merge_finished(args.command, args.config, args.run_dir)
    if merged is None:
        print(
            f"{args.command}: other shard workers still run (or one is merging); the last one "
            "to finish merges"
        )
    elif merged:
        print(f"{args.command}: done (shards merged)")
    else:
        print(
            f"{args.command}: merged the finished part; other shards' questions are missing: "
            "run their workers (or the stage without --shard) to finish"
        )
    return 0


def cmd_workers(args) -> int:
    """Launcher: one shard worker process per visible GPU (or --workers N), then the merge."""
    from rl_circuits.pipeline.distributed import run_stage_workers

    count = run_stage_workers(
        args.command, args.config, args.run_dir, args.workers or None, force=args.force
    )
    print(f"{args.command}: done" + (f" ({count} workers)" if count else ""))
    return 0


def cmd_ray(args) -> int:
    """Ray backend: one task per shard on a Ray cluster (or a local instance), then the merge."""
    from rl_circuits.pipeline.distributed import run_stage_on_ray

    results = run_stage_on_ray(
        args.command,
        args.config,
        args.run_dir,
        args.workers or None,
        args.ray or None,
        force=args.force,
    )
    for result in results:
        print(f"shard {result['shard']}: {result['seconds']:.1f} s on {result['host']}")
    print(f"{args.command}: done" + (f" ({len(results)} Ray tasks)" if results else ""))
    return 0


def cmd_tiny_models(args) -> int:
    """Two tiny checkpoints trained to answer 7, and a GSM8K-format dataset to ask them."""
    from rl_circuits.errors import ConfigError
    from rl_circuits.models.tiny import write_tiny_models

    target = Path(args.directory)
    # the target itself being a file is refused by write_tiny_models; here: a file above it
    blocker = next((p for p in target.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(
            f"tiny-models: {blocker} is a file, so {target} cannot be a directory; name a new or "
            "existing directory"
        )
    for path in write_tiny_models(args.directory):
        print(f"wrote {path}")
    return 0


def cmd_export_graph(args) -> int:
    """One cell's top edges as circuit-tracer / Neuronpedia graph JSON, with graph-metadata.json
    and an offline viewer page beside it."""
    from rl_circuits.analysis.graph_view import cell_graph, write_graph_files
    from rl_circuits.analysis.reader import load_run
    from rl_circuits.errors import ConfigError

    out = Path(args.out)
    if out.suffix != ".json":
        raise ConfigError(f"export-graph: OUT {out} must end in .json (the graph file)")
    if args.top < 1:
        raise ConfigError(f"export-graph: --top must be >= 1, got {args.top}")
    graph = cell_graph(
        load_run(args.run),
        args.pair,
        args.role,
        args.alpha,
        args.top,
        out.stem,
        dataset=args.dataset,
        direction=args.direction,
    )
    for path in write_graph_files(graph, out):
        print(f"wrote {path}")
    return 0


def _prepare_tiny_models(config: str) -> None:
    """Write the config's `tiny_models` directory first when it is absent (configs/tiny.toml)."""
    from rl_circuits.config import load_config

    directory = load_config(config).run.tiny_models
    if directory and not Path(directory).exists():
        from rl_circuits.models.tiny import write_tiny_models  # torch: only when writing

        print(f"tiny_models: {directory} is absent; writing it (rl-circuits tiny-models)")
        for path in write_tiny_models(directory):
            print(f"wrote {path}")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """--shard, --workers, --ray: data parallel over questions (pipeline.distributed)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--shard",
        metavar="I/N",
        help="be shard worker I of N: process every N-th chunk (generate) or batch (attribute) "
        "of questions from I, alongside the other workers on the same run directory; the last "
        "one to finish merges",
    )
    mode.add_argument(
        "--workers",
        metavar="N",
        nargs="?",
        type=int,
        const=0,
        help="start N shard workers here, one per visible GPU (default: as many as GPUs, 1 on "
        "CPU), then merge; with --ray: the number of Ray tasks",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        nargs="?",
        const="",
        help="run the shards as Ray tasks on the cluster at ADDRESS ('auto', "
        "'ray://host:10001'; default: start a local instance), then merge (needs the ray extra)",
    )
    p.add_argument("--no-merge", action="store_true", help=argparse.SUPPRESS)


# Modules the zoo's training needs (the `zoo` extra), checked before any training starts.
ZOO_MODULES = ("trl", "accelerate")


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    import importlib.util

    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package absent, or a module without spec
            found = False
        if not found:
            missing.append(name)
    return missing


def _zoo(args) -> int:
    """`rl-circuits zoo ACTION [options]`; the only action is build."""
    from rl_circuits.errors import ConfigError

    if args.action is None:
        raise ConfigError(
            "zoo: name an action: `rl-circuits zoo build` trains (or reuses) the demo's model "
            "zoo; `rl-circuits zoo build --help` lists its options"
        )
    return _zoo_main(args.args)


def _zoo_main(argv: list[str]) -> int:
    from rl_circuits.errors import ConfigError

    missing = _missing_modules(ZOO_MODULES)
    if missing and not {"-h", "--help"} & set(argv):
        raise ConfigError(
            f"zoo build trains with {', '.join(missing)}, which "
            f"{'are' if len(missing) > 1 else 'is'} not installed: run "
            "`pip install 'rl-circuits[zoo]'` (the zoo extra) first"
        )
    from rl_circuits.zoo import main as zoo_main

    return zoo_main(argv)


def _demo(run_dir: str | None, subset: str) -> int:
    from rl_circuits.cli.demo import run_demo
    from rl_circuits.errors import ConfigError
    from rl_circuits.zoo import ZooConfig, default_root, load_zoo

    missing = _missing_modules(ZOO_MODULES)
    if missing and load_zoo(default_root(ZooConfig()), ZooConfig()) is None:
        raise ConfigError(
            f"the demo first trains its model zoo with {', '.join(missing)}, which "
            f"{'are' if len(missing) > 1 else 'is'} not installed: run "
            "`pip install 'rl-circuits[zoo]'` (the zoo extra), or `make demo`"
        )
    return run_demo(run_dir, subset=subset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl-circuits",
        description="Compare a model's edge-attribution circuitry before and after "
        "post-training. Stages: " + " -> ".join(STAGE_NAMES) + "; `run` chains them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, what: str, more: str = "") -> argparse.ArgumentParser:
        description = f"{what[0].upper()}{what[1:]}.{more}"
        return sub.add_parser(name, help=what, description=description)

    for name in ("run", *STAGE_NAMES):
        if name == "run":
            p = command(name, "run every stage that is not done, in order", RESUME_NOTE)
        else:
            p = command(
                name, STAGES[name].summary, f" A stale earlier stage runs first.{RESUME_NOTE}"
            )
        p.add_argument("config", help="TOML run config, e.g. configs/paper.toml")
        p.add_argument(
            "--run-dir",
            help="run directory: absent, empty or an earlier run (default: the config's run_dir)",
        )
        p.add_argument("--force", action="store_true", help=FORCE_HELP)
        if name in SHARDED_STAGES:
            _add_parallel_flags(p)
        p.set_defaults(func=cmd_stage)
    p = command(
        "check-model",
        "load a checkpoint into TransformerLens and Hugging Face, compare their logits and "
        "print the size of each graph",
    )
    p.add_argument("path", help="checkpoint directory or hub id")
    p.add_argument("--revision", help="hub revision (branch, tag or commit; default: main)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16"],
        help="dtype of both models (default float32)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest max |logit difference| / max |logit| that passes (default per dtype: "
        + ", ".join(f"{k} {v:g}" for k, v in CHECK_TOLERANCES.items())
        + ")",
    )
    p.set_defaults(func=cmd_check_model)
    p = command("zoo", "the demo's SFT/GRPO/DPO model zoo: `rl-circuits zoo build --help`")
    p.add_argument("action", nargs="?", choices=["build"], help="build: train (or reuse) the zoo")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of `zoo build`")
    p.set_defaults(func=_zoo)
    p = command("demo", "build the model zoo if absent and run the whole study on it")
    p.add_argument("--run-dir", help="run directory (default runs/demo, runs/demo-SUBSET)")
    p.add_argument(
        "--subset",
        default=DEFAULT_SUBSET,
        choices=SUBSETS,
        help="the questions to study (`select.subset`): both_correct (default, the paper's) or "
        "only_after (those post-training fixed), ...",
    )
    p.set_defaults(func=lambda args: _demo(args.run_dir, args.subset))
    p = command(
        "export-graph",
        "write one cell's top-K edges as attribution-graph JSON (circuit-tracer, Neuronpedia) "
        "and an offline viewer page",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="OUT.json; graph-metadata.json and OUT.html are written beside it")
    p.add_argument("--pair", required=True, help="the pair, as the run's config names it")
    p.add_argument("--role", required=True, help="before, after or diff")
    p.add_argument("--alpha", required=True, type=float, help="the selection's alpha")
    p.add_argument("--top", type=int, default=50, help="edges by |mean score| (default 50)")
    p.add_argument("--dataset", help="default: the run's only dataset")
    p.add_argument(
        "--direction", help="with --role diff: the diff stage's direction (after_into_before)"
    )
    p.set_defaults(func=cmd_export_graph)
    p = command(
        "tiny-models",
        "write the tiny before/after checkpoints and the dataset configs/tiny.toml runs on",
    )
    p.add_argument(
        "directory", help="where to write before/, after/ and data/ (nothing there is replaced)"
    )
    p.set_defaults(func=cmd_tiny_models)
    return parser


def _one_line_warnings(fallback):
    """A `warnings.showwarning` that prints our own warnings as one `warning: ...` line, each
    once (the config is read more than once), and passes any other to `fallback`."""
    from rl_circuits.errors import RLCircuitsWarning

    shown: set[str] = set()

    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, RLCircuitsWarning):
            if str(message) not in shown:
                shown.add(str(message))
                print(f"warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show


def main(argv: list[str] | None = None) -> int:
    from rl_circuits.errors import RLCircuitsError, RLCircuitsWarning

    args = build_parser().parse_args(argv)
    # grading supplies its own timeout; math-verify warns about its own being off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        _threads()
        with warnings.catch_warnings():
            warnings.simplefilter("always", RLCircuitsWarning)  # shown once each by the next line
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.func(args)
    except RLCircuitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished work is saved; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
