"""Issue 28: the demo says whether its accuracies equal the README's (read from one file)."""

from pathlib import Path

from rl_circuits.zoo.claims import accuracy_line, compare_with_readme, load_claims

CLAIMS = {"test_size": 300, "accuracy": {"sft": 0.393, "grpo": 0.47, "dpo": 0.473}}


def test_equal_accuracies_are_reported_equal():
    run = {"sft": 118 / 300, "grpo": 141 / 300, "dpo": 142 / 300}  # 39.3%, 47.0%, 47.3%
    assert compare_with_readme(run, 300, CLAIMS) == (
        "README check: this run's accuracies equal the README's"
    )


def test_different_accuracies_are_named_plainly():
    run = {"sft": 103 / 300, "grpo": 101 / 300, "dpo": 142 / 300}  # 34.3%, 33.7%, 47.3%
    line = compare_with_readme(run, 300, CLAIMS)
    assert line.startswith("README check: this run DIFFERS from the README's numbers")
    assert "SFT 34.3% vs 39.3%" in line and "GRPO 33.7% vs 47.0%" in line
    assert "DPO" not in line.split("(", 1)[1].split(")")[0]  # DPO agrees: not listed
    assert "not comparable" in compare_with_readme(run, 64, CLAIMS)


def test_readme_states_the_numbers_of_the_data_file():
    claims = load_claims()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert accuracy_line(claims["accuracy"], claims["test_size"]) in readme
