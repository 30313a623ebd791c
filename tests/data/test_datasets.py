"""Dataset loading: the shared offline copies, custom formats, errors, and the hub path (mocked)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest

from rl_circuits.data.datasets import Record, dataset_file, dataset_hash, load_dataset
from rl_circuits.errors import ConfigError, DataError

SHARED = Path("/work/shared/data")


@pytest.mark.parametrize(
    ("name", "count", "first_id", "first_gold"),
    [
        ("gsm8k", 1319, "gsm8k-0", "18"),
        ("math500", 500, "math500-precalculus_807", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        (
            "college_math",
            2818,
            "college_math-Beginning_and_Intermediate_Algebra_exercise.0.4.61",
            "$10-4 n$",
        ),
    ],
)
def test_shared_files_load(name, count, first_id, first_gold):
    records = load_dataset(name, data_dir=SHARED)
    assert len(records) == count
    assert len({r.id for r in records}) == count
    assert all(r.id.startswith(f"{name}-") for r in records)
    assert all(r.question.strip() and r.gold.strip() for r in records)
    assert (records[0].id, records[0].gold) == (first_id, first_gold)
    assert records[0].to_dict() == {
        "id": first_id,
        "question": records[0].question,
        "gold": first_gold,
    }


def test_gsm8k_gold_is_the_number_after_hashes_without_commas():
    records = {r.id: r for r in load_dataset("gsm8k", data_dir=SHARED)}
    raw = [json.loads(line) for line in (SHARED / "gsm8k/test.jsonl").open()]
    with_commas = [row for row in raw if "," in row["answer"].rsplit("####", 1)[1]]
    assert len(with_commas) == 14  # e.g. "#### 2,125"
    for row in with_commas:
        expected = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert records[f"gsm8k-{row['idx']}"].gold == expected
    assert all(r.gold.lstrip("-").replace(".", "").isdigit() for r in records.values())


def test_limit_and_ids_pick_records_in_dataset_order():
    assert [r.id for r in load_dataset("gsm8k", data_dir=SHARED, limit=3)] == [
        "gsm8k-0",
        "gsm8k-1",
        "gsm8k-2",
    ]
    picked = load_dataset("gsm8k", data_dir=SHARED, ids=["gsm8k-7", "gsm8k-2"])
    assert [r.id for r in picked] == ["gsm8k-2", "gsm8k-7"]  # dataset order
    assert load_dataset("gsm8k", data_dir=SHARED, ids=["gsm8k-7", "gsm8k-2"], limit=1) == [
        picked[0]
    ]
    with pytest.raises(DataError, match="no record with id gsm8k-99999.*gsm8k-0, gsm8k-1"):
        load_dataset("gsm8k", data_dir=SHARED, ids=["gsm8k-3", "gsm8k-99999"])
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("gsm8k", data_dir=SHARED, limit=0)


def write(root: Path, name: str, lines: list[str], split: str = "test") -> Path:
    path = root / name / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_custom_dataset_formats_are_detected(tmp_path):
    write(tmp_path, "synth_gsm", [json.dumps({"question": "1+1?", "answer": "so\n#### 1,002"})])
    write(
        tmp_path,
        "synth_math",
        [json.dumps({"problem": "p", "answer": "\\frac12", "unique_id": "test/a/1.json"})],
    )
    write(tmp_path, "synth_sol", [json.dumps({"problem": "p", "solution": "x \\boxed{\\{1\\}}."})])
    write(tmp_path, "synth_qa", [json.dumps({"question": "q", "answer": "$x=2$"})], split="dev")
    assert load_dataset("synth_gsm", data_dir=tmp_path) == [Record("synth_gsm-0", "1+1?", "1002")]
    assert load_dataset("synth_math", data_dir=tmp_path) == [
        Record("synth_math-a_1", "p", "\\frac12")
    ]
    assert load_dataset("synth_sol", data_dir=tmp_path)[0].gold == "\\{1\\}"
    assert load_dataset("synth_qa", data_dir=tmp_path, split="dev")[0].gold == "$x=2$"


def test_duplicate_own_ids_fall_back_to_line_index(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}", "idx": 5} for i in range(3)]
    write(tmp_path, "dup", [json.dumps(r) for r in rows])
    assert [r.id for r in load_dataset("dup", data_dir=tmp_path)] == ["dup-0", "dup-1", "dup-2"]


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = write(tmp_path, "bad", [good, "", "{not json", good])
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_dataset("bad", data_dir=tmp_path)
    assert f"{path}:3" in str(err.value)  # the blank line 2 still counts


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ({"question": "q"}, "answer"),
        ({"question": " ", "answer": "#### 2"}, "question"),
        ({"question": "q", "answer": "no hashes here"}, "gold answer"),
    ],
)
def test_missing_field_names_file_and_line(tmp_path, row, what):
    first = json.dumps({"question": "q", "answer": "#### 1"})
    path = write(tmp_path, "gaps", [first, json.dumps(row)])
    with pytest.raises(DataError, match=what) as err:
        load_dataset("gaps", data_dir=tmp_path)
    assert f"{path}:2" in str(err.value)


def test_unknown_format_is_reported(tmp_path):
    path = write(tmp_path, "odd", [json.dumps({"text": "hello"})])
    with pytest.raises(DataError, match="unknown dataset format") as err:
        load_dataset("odd", data_dir=tmp_path)
    assert f"{path}:1" in str(err.value)


def test_missing_directory_or_file(tmp_path):
    with pytest.raises(DataError, match="set data_dir \\(in the config\\)") as err:
        load_dataset("nowhere", data_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("gsm8k", data_dir=tmp_path, split="train")
    assert str(dataset_file("gsm8k", tmp_path, "train")) in str(err.value)
    empty = write(tmp_path, "empty", [""])
    with pytest.raises(DataError, match="holds no records") as err:
        load_dataset("empty", data_dir=tmp_path)
    assert str(empty) in str(err.value)


def test_dataset_hash_is_the_file_sha256_and_changes_with_it(tmp_path):
    path = write(tmp_path, "h", ['{"question": "q", "answer": "#### 1"}'])
    assert dataset_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = dataset_hash(path)
    path.write_text(path.read_text() + " ")
    assert dataset_hash(path) != before
    with pytest.raises(DataError, match="cannot read"):
        dataset_hash(tmp_path / "missing.jsonl")


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the `datasets` library with an in-memory hub; records each call."""
    calls = []
    tables = {
        ("openai/gsm8k", "main"): [{"question": "q0", "answer": "w\n#### 4"}],
        ("HuggingFaceH4/MATH-500", None): [
            {"problem": "p", "answer": "7", "solution": "s", "unique_id": "test/algebra/3.json"}
        ],
    }

    def load(repo, config=None, split="test"):
        calls.append((repo, config, split))
        if repo == "EleutherAI/hendrycks_math":
            return [{"problem": f"{config} p", "solution": "so $\\boxed{2}$", "level": "1"}]
        if (repo, config) not in tables:
            raise ConnectionError("offline")
        return tables[(repo, config)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))
    return calls


def test_hub_datasets_load_with_ids_and_every_math_subject(fake_hub):
    assert load_dataset("gsm8k") == [Record("gsm8k-0", "q0", "4")]
    assert load_dataset("math500") == [Record("math500-algebra_3", "p", "7")]
    full = load_dataset("math")
    assert len(full) == 7  # one record per subject config, concatenated
    assert [r.id for r in full] == [f"math-{i}" for i in range(7)]
    assert {r.gold for r in full} == {"2"}
    assert full[0].question == "algebra p"
    assert fake_hub[:2] == [
        ("openai/gsm8k", "main", "test"),
        ("HuggingFaceH4/MATH-500", None, "test"),
    ]


def test_dataset_without_hub_copy_or_network_asks_for_data_dir(fake_hub, monkeypatch):
    with pytest.raises(
        DataError, match="no copy on the Hugging Face hub.*set data_dir \\(in the config\\)"
    ):
        load_dataset("college_math")
    with pytest.raises(
        DataError, match="unknown dataset 'synth'.*set data_dir \\(in the config\\)"
    ):
        load_dataset("synth")
    assert fake_hub == []  # neither touched the hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        DataError, match="ConnectionError: no network.*set data_dir \\(in the config\\)"
    ):
        load_dataset("gsm8k")


# ----------------------------------------------------- the harness's other benchmarks


@pytest.mark.parametrize(
    ("name", "row", "expected_id", "gold"),
    [
        (
            "minerva_math",
            {"problem": "Find s.", "solution": "So $s=\\boxed{1.6}$ cm.", "type": "t", "idx": "0"},
            "minerva_math-0",
            "1.6",
        ),
        (
            "olympiadbench",
            {"id": 1606, "question": "How many moves?", "final_answer": ["$2$"], "unit": None},
            "olympiadbench-1606",
            "$2$",
        ),
        (
            "aime24",
            {"id": "60", "problem": "Find t.", "solution": "...", "answer": "204", "url": "u"},
            "aime24-60",
            "204",
        ),
        (
            "amc23",
            {"id": "0", "problem": "How far?", "question": "How far?", "answer": 27.0},
            "amc23-0",
            "27.0",
        ),
    ],
)
def test_harness_format_benchmarks(tmp_path, name, row, expected_id, gold):
    (tmp_path / name).mkdir()
    (tmp_path / name / "test.jsonl").write_text(json.dumps(row) + "\n")
    (record,) = load_dataset(name, data_dir=tmp_path)
    assert record.id == expected_id and record.gold == gold
    assert record.question == row.get("question", row.get("problem"))


@pytest.mark.parametrize("name", ["minerva_math", "olympiadbench", "aime24", "amc23"])
def test_harness_format_benchmarks_need_a_local_copy(name):
    with pytest.raises(DataError, match=f"holds {name}/test.jsonl"):
        load_dataset(name)


def test_every_row_is_read_by_one_rule_and_a_mixed_file_is_refused(tmp_path):
    """A first row without `####` used to make later GSM8K rows' gold "#### 7" (issue 22)."""
    rows = [{"question": "a", "answer": "7"}, {"question": "b", "answer": "so\n#### 8"}]
    path = write(tmp_path, "mix", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as err:
        load_dataset("mix", data_dir=tmp_path)
    assert str(err.value) == (
        f"{path}:2: this row is in the GSM8K format (question, and an answer ending in a "
        f"'#### GOLD' line), but {path}:1 is in the College Math format (question, and the gold "
        "answer as answer, no '####'); a dataset file holds one format (docs/datasets.md): fix "
        "the row or split the file"
    )
    rows = [{"problem": "p", "answer": "1"}, {"problem": "q", "solution": "\\boxed{2}"}]
    write(tmp_path, "mix2", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"test.jsonl:2: this row is in the MATH format"):
        load_dataset("mix2", data_dir=tmp_path)
    rows = [{"question": "a", "answer": "#### 7"}, {"question": "b", "answer": "so\n#### 8"}]
    write(tmp_path, "same", [json.dumps(r) for r in rows])
    assert [r.gold for r in load_dataset("same", data_dir=tmp_path)] == ["7", "8"]


def test_a_rows_own_id_field_names_the_question(tmp_path):
    rows = [
        {"id": "q/7", "question": "a", "answer": "#### 7", "idx": 0},
        {"id": 12, "question": "b", "answer": "#### 8", "idx": 1},
    ]
    write(tmp_path, "ids", [json.dumps(r) for r in rows])
    assert [r.id for r in load_dataset("ids", data_dir=tmp_path)] == ["ids-q_7", "ids-12"]
    rows = [{"id": "x", "problem": "p", "answer": "1"}, {"id": "x", "problem": "q", "answer": "2"}]
    write(tmp_path, "twice", [json.dumps(r) for r in rows])  # not unique: row indices
    assert [r.id for r in load_dataset("twice", data_dir=tmp_path)] == ["twice-0", "twice-1"]
