"""The model card of each zoo checkpoint: `zoo_card.json` (everything about it) and a README.md
that says how it was trained and how to load it with plain `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

from rl_circuits.zoo.paired import describe
from rl_circuits.zoo.tasks import DATASET_NAME


def write_card(path: Path, recipe: str, manifest: dict) -> None:
    """zoo_card.json (everything about this checkpoint) and a human-readable README.md."""
    card = manifest["stages"][recipe]
    config = manifest["config"]
    payload = {
        "stage": recipe,
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
        f"# toy-{recipe}: {card['algorithm']} checkpoint of the rl-circuits demo zoo",
        "",
        f"A {manifest['parameters']:,}-parameter `Qwen2ForCausalLM` (character tokenizer), "
        f"trained on CPU from the {parent} on `{DATASET_NAME}`, synthetic arithmetic word "
        f"problems (up to {len(config['task']['step_weights'])} steps, amounts up to "
        f"{config['task']['max_amount']}) whose solutions end in `\\boxed{{N}}`.",
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
        + (f", {recipe} {card['settings']['seed']}" if recipe != "sft" else ""),
        f"- weights sha256: `{card['sha256']}`",
        f"- zoo config digest: `{manifest['digest']}`; full settings in `zoo_card.json`",
    ]
    if recipe == "dpo":
        pairs = card["pairs"]
        lines.append(
            f"- preference pairs: {pairs['pairs']} (sampled once from the SFT model: "
            f"{pairs['samples']} samples of {pairs['prompts']} training questions, "
            f"sample accuracy {pairs['sample_accuracy']:.3f}); see `preference_pairs.jsonl`"
        )
    if recipe == "sft":
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
