"""The `rl-circuits` command: one subcommand per pipeline stage, `run` to chain them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

STAGES = ("datasets", "generate", "grade", "select", "attribute", "analyze", "report")
CHECK_PROMPT = "Natalia sold clips to 48 of her friends in April. 48 / 2 = 24. \\boxed{72}"


def _threads() -> None:
    """One torch thread unless the user asks otherwise: two on a busy 2-core box run 30x slower."""
    import torch

    torch.set_num_threads(int(os.environ.get("RL_CIRCUITS_THREADS", "1")))


def cmd_check_model(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from rl_circuits.checkpoints import load_tokenizer, resolve
    from rl_circuits.graph import GRAPHS, build_graph
    from rl_circuits.loading import load_model

    dtype = getattr(torch, args.dtype)
    ckpt = resolve(args.path, args.revision)
    model = load_model(args.path, revision=args.revision, dtype=dtype, device=args.device)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=dtype, use_safetensors=True)
    hf.to(args.device)
    tokens = load_tokenizer(ckpt.path)(CHECK_PROMPT, return_tensors="pt").input_ids
    tokens = tokens.to(args.device)
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"checkpoint: {ckpt.path} ({ckpt.architecture}, {model.cfg.n_layers} layers)")
    print(
        f"max |logit difference| vs Hugging Face ({args.dtype}, {tokens.shape[1]} tokens): "
        f"{diff:.3e}"
    )
    for name in GRAPHS:
        graph = build_graph(name, model.cfg.n_layers)
        print(
            f"graph {name!r}: {len(graph.upstream)} upstream x {len(graph.downstream)} "
            f"downstream nodes, {graph.n_edges} edges"
        )
    return 0 if diff < args.tolerance else 1


def _open(args):
    from rl_circuits.config import load_config
    from rl_circuits.store import RunStore

    cfg = load_config(args.config)
    run_dir = Path(args.run_dir or cfg["run"]["run_dir"])
    store = RunStore.open(run_dir, cfg.resolved(), force=args.force)
    return cfg, store


def stage_functions() -> dict:
    from rl_circuits import analysis, pipeline

    return {
        "datasets": pipeline.stage_datasets,
        "generate": pipeline.stage_generate,
        "grade": pipeline.stage_grade,
        "select": pipeline.stage_select,
        "attribute": pipeline.stage_attribute,
        "analyze": analysis.stage_analyze,
        "report": analysis.stage_report,
    }


def cmd_stage(args) -> int:
    from rl_circuits import pipeline

    functions = stage_functions()
    cfg, store = _open(args)
    with store:
        stages = STAGES if args.command == "run" else (args.command,)
        for stage in stages:
            if stage == "attribute" and args.command == "attribute" and args.shard:
                i, n = (int(x) for x in args.shard.split("/"))
                pipeline.stage_attribute(cfg, store, shard=(i, n))
                continue
            if args.command == "run" and store.stage_done(stage):
                print(f"{stage}: done")
                continue
            functions[stage](cfg, store)
            print(f"{stage}: done")
    print(f"run directory: {store.root}")
    return 0


TINY_QUESTIONS = [
    ("What is 3+4", 7),
    ("What is 2+5", 7),
    ("What is 9-2", 7),
    ("What is 1+6", 7),
    ("What is 14/2", 7),
    ("What is 2+2", 4),
]


def cmd_tiny_models(args) -> int:
    """Two tiny checkpoints trained to answer 7, and a GSM8K-format dataset to ask them."""
    import json

    from rl_circuits.tiny import make_tiny_checkpoint

    out = Path(args.directory)
    for role, seed, answer in (
        ("before", 1, "3+4 is 7, so \\boxed{7}"),
        ("after", 2, "We add: 3+4 = 7. The total is \\boxed{7}"),
    ):
        make_tiny_checkpoint(out / role, "Qwen2ForCausalLM", seed=seed, answer=answer)
        print(f"wrote {out / role}")
    data = out / "data" / "sevens"
    data.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "answer": f"#### {a}"}) for q, a in TINY_QUESTIONS]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {data / 'test.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl-circuits",
        description="Compare a model's edge-attribution circuitry before and after "
        "post-training. Stages: " + " -> ".join(STAGES) + "; `run` chains them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGES):
        p = sub.add_parser(name, help="run every stage" if name == "run" else f"the {name} stage")
        p.add_argument("config", help="TOML run config, e.g. configs/paper.toml")
        p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
        p.add_argument("--force", action="store_true", help="accept a changed config")
        if name == "attribute":
            p.add_argument("--shard", help="i/n: process every n-th question from i (one GPU)")
        p.set_defaults(func=cmd_stage)
    p = sub.add_parser("check-model", help="load a checkpoint both ways and compare logits")
    p.add_argument("path", help="checkpoint directory or hub id")
    p.add_argument("--revision")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.set_defaults(func=cmd_check_model)
    p = sub.add_parser("tiny-models", help="write the tiny before/after checkpoints of tiny.toml")
    p.add_argument("directory")
    p.set_defaults(func=cmd_tiny_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rl_circuits.errors import RLCircuitsError

    args = build_parser().parse_args(argv)
    _threads()
    # grading supplies its own timeout; math-verify warns about its own being off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
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
