"""The demo model zoo: seeded task and grader, then a reduced SFT -> GRPO / DPO build.

The slow tests share one reduced zoo (a 0.1M-parameter Qwen2 on one-step problems, a few
seconds per recipe) and check that each recipe does what it should, that checkpoints load in
TransformerLens and Hugging Face, that the pairs are registered, that the cache is reused,
and that a second build from the same seeds gives bit-identical weights.
"""

import contextlib
import dataclasses
import io
import json
import math
import random
import re
import shutil
import tomllib
import typing
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_circuits.cli.main import main as cli_main
from rl_circuits.data.datasets import load_dataset
from rl_circuits.models.checkpoints import load_tokenizer
from rl_circuits.models.loading import load_model
from rl_circuits.models.pairs import load_pairs
from rl_circuits.models.tiny import ARCHITECTURES, char_tokenizer, make_tiny_checkpoint
from rl_circuits.resources import resource_dir
from rl_circuits.zoo import ZooConfig, build_zoo, load_zoo, main, summary_lines
from rl_circuits.zoo.build import DONE_FILE, RECIPES, STARTED_FILE
from rl_circuits.zoo.dpo import DPOSettings, train_dpo
from rl_circuits.zoo.grpo import GRPOSettings, train_grpo
from rl_circuits.zoo.model import make_tokenizer, sha256_file
from rl_circuits.zoo.paired import mcnemar_exact
from rl_circuits.zoo.sft import train_sft
from rl_circuits.zoo.tasks import (
    extract_answer,
    generate_splits,
    is_correct,
    read_jsonl,
    teacher_solution,
    write_splits,
)
from rl_circuits.zoo.training import TrainResult, TRLJob, train_with_trl

SIZES = {"train": 300, "validation": 50, "test": 50}


def test_generator_is_seeded_and_splits_are_disjoint():
    first, again, other = (generate_splits(seed, SIZES) for seed in (7, 7, 8))
    assert first == again
    assert first["test"] != other["test"]
    questions = [{p.question for p in first[split]} for split in ("train", "validation", "test")]
    assert sum(map(len, questions)) == sum(SIZES.values())  # unique and disjoint
    steps = {p.steps for p in first["train"]}
    assert steps == {1, 2}
    lengths = {len(p.solution) for p in first["train"]}
    assert max(lengths) - min(lengths) >= 6  # answers of varying length


def test_amounts_stay_within_the_task_range():
    for problem in generate_splits(3, SIZES, max_amount=9, max_operand=4)["train"]:
        for line in problem.solution.split("\n")[:-1]:
            left, right = line.split("=")
            operand = int(left.replace("+", "-").split("-")[1])
            assert 1 <= int(right) <= 9 and 1 <= operand <= 4


def test_a_task_too_small_for_its_splits_is_refused():
    with pytest.raises(ValueError, match="too few distinct questions"):
        generate_splits(0, {"train": 5000}, max_amount=2, max_operand=1, step_weights=(1.0,))


def test_teacher_misreads_only_the_named_verb():
    problems = generate_splits(0, SIZES)["train"]
    rng = random.Random(0)
    # An infallible teacher, or one misreading a verb the task never uses, writes the gold.
    for problem in problems:
        assert teacher_solution(problem, (), 1.0, rng) == problem.solution
        assert teacher_solution(problem, ("sells",), 0.0, rng) == problem.solution
    selling = [p for p in problems if "sells" in p.question]
    others = [p for p in problems if "sells" not in p.question]
    assert selling and others
    for problem in others:
        assert teacher_solution(problem, ("sells",), 1.0, rng) == problem.solution
    for problem in selling:
        written = teacher_solution(problem, ("sells",), 1.0, rng)
        assert extract_answer(written) > problem.answer  # added instead of subtracted
        assert written.count("-") == problem.solution.count("-") - problem.question.count("sells")
    one_step = [p for p in selling if p.steps == 1]
    for problem in one_step:  # "Ann has 7 pens, sells 2." -> 7+2=9
        start, sold = map(int, re.findall(r"\d+", problem.question))
        expected = f"{start}+{sold}={start + sold}\n\\boxed{{{start + sold}}}"
        assert teacher_solution(problem, ("sells",), 1.0, rng) == expected
    shares = [teacher_solution(p, ("sells",), 0.8, rng) != p.solution for p in selling * 20]
    assert 0.75 < sum(shares) / len(shares) < 0.85  # the rate, over many draws


def test_solutions_show_steps_and_end_in_boxed_answer():
    for problem in generate_splits(0, SIZES)["test"]:
        lines = problem.solution.split("\n")
        assert len(lines) == problem.steps + 1
        assert lines[-1] == f"\\boxed{{{problem.answer}}}"
        assert problem.answer >= 1
        for line in lines[:-1]:  # each step is a true equation
            left, right = line.split("=")
            assert eval(left) == int(right)  # noqa: S307 (digits and + - * only)
        assert is_correct(problem.solution, problem.answer)


def test_grader_compares_last_boxed_integer():
    assert extract_answer("3+4=7\n\\boxed{7}") == 7
    assert extract_answer("\\boxed{5} no, \\boxed{ 12 }") == 12
    assert extract_answer("7") is None and extract_answer("\\boxed{x}") is None
    assert is_correct("\\boxed{42}", "42") and not is_correct("\\boxed{41}", 42)
    assert not is_correct("", 3)


def test_splits_load_with_the_pipeline_reader(tmp_path):
    splits = generate_splits(0, SIZES)
    folder = write_splits(tmp_path, splits)
    assert read_jsonl(folder / "test.jsonl") == splits["test"]
    for split in ("train", "validation", "test"):
        records = load_dataset("toy_math", data_dir=tmp_path, split=split)
        assert [r.question for r in records] == [p.question for p in splits[split]]
        assert [r.gold for r in records] == [str(p.answer) for p in splits[split]]


def test_config_digest_and_round_trip():
    config = ZooConfig()
    assert ZooConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.digest() == ZooConfig().digest()
    changed = dataclasses.replace(config, sft=dataclasses.replace(config.sft, seed=99))
    assert changed.digest() != config.digest()
    assert config.reduced().digest() != config.digest()
    with pytest.raises(ValueError, match="learning_rat"):
        ZooConfig.from_dict({"sft": {"learning_rat": 1.0}})


def test_config_file_holds_the_defaults():
    raw = tomllib.loads((resource_dir("configs") / "zoo.toml").read_text())
    assert ZooConfig.from_dict(raw["zoo"]) == ZooConfig()


def test_build_refuses_a_folder_that_holds_no_zoo(tmp_path, capsys):
    from rl_circuits.cli.main import main
    from rl_circuits.errors import StoreError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds no zoo; nothing there is changed"):
        build_zoo(ZooConfig().reduced(), root=tmp_path, progress=False, register=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    args = ["zoo", "build", "--reduced", "--no-register", "--quiet", "--root", str(tmp_path)]
    assert main(args) == 2  # one line, no traceback (issue 22)
    assert capsys.readouterr().err.startswith(f"error: zoo folder {tmp_path} is not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tokenizer_is_one_token_per_character_and_round_trips(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Q: Ann has 3 pens.\nA: 3+4=7\n\\boxed{7}"
    ids = loaded(text).input_ids
    assert len(ids) == len(text) and loaded.unk_token_id not in ids  # no <bos>, like Qwen2
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    assert loaded(text, add_special_tokens=False).input_ids == ids


# ---- one reduced zoo, shared by the slow tests -------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(zoo, home, output): the reduced zoo built under a temporary RL_CIRCUITS_HOME, with
    progress on, and what the build printed (stdout and stderr together)."""
    home = tmp_path_factory.mktemp("home")
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RL_CIRCUITS_HOME", str(home))
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            zoo = build_zoo(ZooConfig().reduced(), progress=True)
        yield zoo, home, output.getvalue()


@pytest.fixture(scope="module")
def reduced(built):
    """(zoo, home) of the shared reduced zoo."""
    zoo, home, _ = built
    return zoo, home


def card(zoo, recipe) -> dict:
    return json.loads((zoo.checkpoint(recipe) / "zoo_card.json").read_text())


def weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_layout_data_and_cards(reduced):
    zoo, home = reduced
    assert (
        zoo.root.parent == home / "zoo"
        and zoo.root.name == json.loads((zoo.root / DONE_FILE).read_text())["digest"]
    )
    assert (zoo.root / DONE_FILE).is_file()
    assert len(load_dataset("toy_math", data_dir=zoo.data_dir, split="test")) == 64
    for recipe in RECIPES:
        path = zoo.checkpoint(recipe)
        info = card(zoo, recipe)
        assert info["sha256"] == sha256_file(path / "model.safetensors")
        assert info["steps"] > 0 and info["train_wall_s"] > 0
        assert info["settings"]["seed"] == getattr(zoo.config, recipe).seed
        assert info["test_accuracy"] == zoo.accuracy[recipe]
        assert "test_accuracy_before" in info
        assert "greedy test accuracy" in (path / "README.md").read_text()


@pytest.mark.slow
def test_sft_is_above_chance(reduced):
    zoo, _ = reduced
    info = card(zoo, "sft")
    # Chance: an exact integer answer in \boxed{}; the untrained model scores 0.
    assert info["test_accuracy_before"] == 0.0
    assert zoo.accuracy["sft"] >= 0.1  # measured about 0.3 for the reduced zoo


@pytest.mark.slow
def test_grpo_changes_weights_and_keeps_accuracy(reduced):
    zoo, _ = reduced
    sft, grpo = weights(zoo.sft), weights(zoo.grpo)
    assert sft.keys() == grpo.keys()
    assert any(not torch.equal(sft[k], grpo[k]) for k in sft)
    assert card(zoo, "grpo")["history"]  # TRL logged rewards
    assert zoo.accuracy["grpo"] >= zoo.accuracy["sft"] - 0.15


@pytest.mark.slow
def test_dpo_trains_on_real_pairs(reduced):
    zoo, _ = reduced
    pairs = [json.loads(line) for line in (zoo.dpo / "preference_pairs.jsonl").open()]
    answers = {p.question: p.answer for p in read_jsonl(zoo.data_dir / "toy_math" / "train.jsonl")}
    template = zoo.template
    head, tail = template.split("{q}")
    assert pairs and len(pairs) == card(zoo, "dpo")["pairs"]["pairs"]
    for pair in pairs:
        assert pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"]
        answer = answers[pair["prompt"][len(head) : len(pair["prompt"]) - len(tail)]]
        assert is_correct(pair["chosen"], answer) and not is_correct(pair["rejected"], answer)
    sft, dpo = weights(zoo.sft), weights(zoo.dpo)
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)
    assert card(zoo, "dpo")["loss_type"] == ["sigmoid", "sft"]


@pytest.mark.slow
def test_checkpoints_load_in_transformer_lens_and_hugging_face(reduced):
    zoo, _ = reduced
    prompt = zoo.template.replace("{q}", "Ann has 3 pens, sells 2. How many pens?")
    for recipe in RECIPES:
        path = zoo.checkpoint(recipe)
        tokenizer = load_tokenizer(path)
        tokens = tokenizer(prompt, return_tensors="pt").input_ids
        hf = AutoModelForCausalLM.from_pretrained(path)
        assert type(hf).__name__ == "Qwen2ForCausalLM"
        tl = load_model(path, device="cpu", max_seq_len=128)
        assert torch.equal(tl.to_tokens(prompt), tokens)  # the tokens the zoo trained on
        with torch.no_grad():
            diff = (tl(tokens) - hf(tokens).logits).abs().max().item()
        assert diff < 1e-4


@pytest.mark.slow
def test_pairs_are_registered(reduced, monkeypatch):
    zoo, home = reduced
    monkeypatch.setenv("RL_CIRCUITS_HOME", str(home))
    assert zoo.pairs_file == home / "pairs" / "toy.toml"
    pairs = load_pairs()
    tokenizer = make_tokenizer()
    longest = max(
        len(tokenizer(p.solution, add_special_tokens=False).input_ids)
        for split in ("train", "validation", "test")
        for p in read_jsonl(zoo.data_dir / "toy_math" / f"{split}.jsonl")
    )
    for recipe, algorithm in (("grpo", "GRPO"), ("dpo", "DPO")):
        pair = pairs[f"toy-{recipe}"]
        assert pair.before == str(zoo.sft.resolve())
        assert pair.after == str(zoo.checkpoint(recipe).resolve())
        assert pair.algorithm == algorithm
        assert pair.prompt("2+2?") == zoo.template.replace("{q}", "2+2?")
        assert pair.max_new_tokens > longest  # room for the answer and <eos>


@pytest.mark.slow
def test_cache_is_reused_and_checked(reduced, tmp_path, capsys):
    zoo, _ = reduced
    built_at = json.loads((zoo.root / DONE_FILE).read_text())["built_at"]
    again = build_zoo(zoo.config, progress=False)  # same config: no rebuild
    assert again.root == zoo.root and again.accuracy == zoo.accuracy
    assert json.loads((zoo.root / DONE_FILE).read_text())["built_at"] == built_at
    assert main(["--reduced", "--quiet", "--root", str(zoo.root)]) == 0
    assert "toy-grpo" in capsys.readouterr().out
    other = dataclasses.replace(zoo.config, init_seed=zoo.config.init_seed + 1)
    assert load_zoo(zoo.root, other) is None  # another config does not reuse it
    copy = tmp_path / "copy"
    shutil.copytree(zoo.root, copy)
    assert load_zoo(copy, zoo.config) is not None
    (copy / DONE_FILE).unlink()  # as if the build had been killed before its last write
    assert load_zoo(copy, zoo.config) is None


@pytest.mark.slow
def test_same_seeds_give_identical_weights(reduced, tmp_path):
    """A second build (over a killed build's leftovers) reproduces every checksum."""
    zoo, _ = reduced
    root = tmp_path / "zoo"
    (root / "sft").mkdir(parents=True)
    (root / STARTED_FILE).write_text("killed\n")
    (root / "sft" / "model.safetensors").write_bytes(b"half-written")
    again = build_zoo(zoo.config, root=root, progress=False, register=False)
    for recipe in RECIPES:
        assert card(again, recipe)["sha256"] == card(zoo, recipe)["sha256"], recipe
        assert (
            sha256_file(again.checkpoint(recipe) / "model.safetensors")
            == card(zoo, recipe)["sha256"]
        )


# ---- paired test, output, plain-transformers loading (issues 15, 11, 16) -----------------


def test_grpo_and_dpo_build_their_trl_arguments_in_one_place(tmp_path):
    """The TRL recipes share seeding, CPU and logging settings (`train_with_trl`): a recipe
    adds only its own arguments, and every recipe's training gives one `TrainResult`."""
    made = []

    class Config(dict):
        def __init__(self, **arguments):
            super().__init__(arguments)
            made.append(self)

    class Trainer:
        def __init__(self, model, **arguments):
            self.model, self.arguments, self.callbacks = model, arguments, []
            self.state = SimpleNamespace(global_step=3, log_history=[])

        def remove_callback(self, kind):
            self.callbacks = [c for c in self.callbacks if not isinstance(c, kind)]

        def add_callback(self, callback):
            self.callbacks.append(callback)

        def train(self):
            self.trained = True

    model = torch.nn.Linear(2, 2).train()
    for recipe, settings, own in (
        ("grpo", GRPOSettings(), {"max_steps": 5}),
        ("dpo", DPOSettings(), {"num_train_epochs": 2}),
    ):
        trainer = train_with_trl(
            recipe,
            (Config, Trainer),
            TRLJob(model, "tokenizer", ["data"], "cpu", False, tmp_path / f"{recipe}.jsonl"),
            settings,
            shown=("loss",),
            trainer_arguments={"extra": recipe},
            **own,
        )
        assert trainer.trained and not trainer.model.training  # trained, then in eval mode
        assert trainer.arguments["args"] is made[-1] and trainer.arguments["extra"] == recipe
        assert made[-1]["seed"] == made[-1]["data_seed"] == settings.seed
        assert made[-1]["learning_rate"] == settings.learning_rate and made[-1]["use_cpu"]
    grpo, dpo = made
    from_settings = {"output_dir", "seed", "data_seed", "learning_rate", "beta"}
    assert {k: v for k, v in grpo.items() if k not in from_settings | {"max_steps"}} == {
        k: v for k, v in dpo.items() if k not in from_settings | {"num_train_epochs"}
    }
    for train in (train_sft, train_grpo, train_dpo):
        assert typing.get_type_hints(train)["return"] is TrainResult


def test_mcnemar_exact_counts_discordant_questions():
    before = [True] * 10 + [False] * 10 + [True] * 5
    after = [True] * 10 + [True] * 9 + [False] + [False] * 5
    test = mcnemar_exact(before, after)
    assert (test["gained"], test["lost"]) == (9, 5)
    assert test["gain"] == pytest.approx(4 / 25)
    assert test["before"] == pytest.approx(15 / 25) and test["after"] == pytest.approx(19 / 25)
    # two-sided exact binomial: 2 * P(X <= 5), X ~ Bin(14, 1/2)
    expected = 2 * sum(math.comb(14, k) for k in range(6)) / 2**14
    assert test["p_value"] == pytest.approx(expected)
    assert mcnemar_exact(after, before)["p_value"] == pytest.approx(expected)  # symmetric
    assert mcnemar_exact([True] * 10, [False] * 10)["p_value"] == pytest.approx(2 / 2**10)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    with pytest.raises(ValueError, match="one answer per question"):
        mcnemar_exact([True], [True, False])


@pytest.mark.slow
def test_cards_record_per_question_answers_and_paired_tests(reduced):
    zoo, _ = reduced
    size = zoo.config.task.test_size
    hits = {recipe: card(zoo, recipe)["test_correct"] for recipe in RECIPES}
    for recipe, bits in hits.items():
        assert len(bits) == size and set(bits) <= {"0", "1"}
        assert bits.count("1") / size == pytest.approx(zoo.accuracy[recipe])
    before = [b == "1" for b in hits["sft"]]
    for recipe in ("grpo", "dpo"):
        expected = mcnemar_exact(before, [b == "1" for b in hits[recipe]])
        assert card(zoo, recipe)["paired_test"] == expected == zoo.paired[recipe]
        assert "McNemar exact p = " in (zoo.checkpoint(recipe) / "README.md").read_text()
    lines = summary_lines(zoo)
    assert lines[0].startswith(f"greedy test accuracy ({size} questions): SFT ")
    assert lines[1].startswith("GRPO vs SFT: ") and lines[2].startswith("DPO vs SFT: ")


@pytest.mark.slow
def test_build_shows_progress_and_summaries_not_trainer_dicts(built):
    zoo, _, output = built
    assert "{'loss'" not in output and "'reward'" not in output  # no raw TRL log dicts
    for recipe in RECIPES:
        info = card(zoo, recipe)
        log = zoo.root / info["log"]
        summary = [line for line in output.splitlines() if line.startswith(f"{recipe}: ")]
        assert any(
            f"{info['steps']} steps in " in line and "validation accuracy" in line
            and f"log {log}" in line
            for line in summary
        ), (recipe, summary)  # fmt: skip
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert max(e["step"] for e in entries) == info["steps"]
    grpo_log = [json.loads(line) for line in (zoo.root / "logs" / "grpo.jsonl").open()]
    assert all("reward" in e for e in grpo_log if "loss" in e)
    for desc in ("sft", "grpo", "dpo"):  # one progress bar per recipe
        assert re.search(rf"{desc}: +\d+%", output), desc


PROMPTS = [
    "Q: Ida has 9 pens, loses 3. How many pens?\nA: ",
    "Q:  two  spaces,\n\nnew lines\tand a tab 'quoted' it's\nA: 9*8=72\n\\boxed{72}",
]


def _check_plain_transformers(path, tokenizer) -> None:
    """AutoTokenizer / AutoModelForCausalLM on `path` give the training tokenizer and model."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(path)
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert plain(text).input_ids == ids, type(plain).__name__
        assert plain.decode(ids) == tokenizer.decode(ids)
    assert plain("Q: a b").input_ids == tokenizer("Q: a b").input_ids
    assert plain.decode(plain("Q: a b\nA: ").input_ids) == "Q: a b\nA: "  # spaces kept
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(plain, name) == getattr(tokenizer, name), name
    model = AutoModelForCausalLM.from_pretrained(path)
    saved = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.slow
def test_checkpoints_load_with_plain_transformers(reduced):
    zoo, _ = reduced
    tokenizer = make_tokenizer()
    for recipe in RECIPES:
        path = zoo.checkpoint(recipe)
        _check_plain_transformers(path, tokenizer)
        # the model card's loading example runs as written
        readme = (path / "README.md").read_text()
        code = readme.split("```python\n")[1].split("```")[0]
        assert len(code.strip().splitlines()) == 3
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 (the card's own example)
        assert namespace["tokenizer"](PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids
        assert type(namespace["model"]).__name__ == "Qwen2ForCausalLM"


def test_tiny_models_load_with_plain_transformers(tmp_path, capsys):
    assert cli_main(["tiny-models", str(tmp_path)]) == 0
    for role in ("before", "after"):
        _check_plain_transformers(tmp_path / role, char_tokenizer())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tiny_checkpoints_of_every_family_load_with_plain_transformers(tmp_path, architecture):
    path = make_tiny_checkpoint(tmp_path / "m", architecture)
    _check_plain_transformers(path, char_tokenizer())
