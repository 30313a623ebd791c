"""Evaluation datasets as uniform question/gold records: GSM8K, MATH, MATH-500, College Math,
and the authors' other benchmarks (Minerva Math, OlympiadBench, AIME24, AMC23) in the formats
of the Qwen2.5-Math evaluation harness's data files.

Each source format is read here, in one place: where its gold answer lives (after GSM8K's
`####`, the last `\\boxed{}` of a MATH solution, an `answer` field). `grading.gold_answer`
normalises the text; every other module sees only `Record`s.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_circuits.data.grading import extract_boxed
from rl_circuits.errors import ConfigError, DataError

HUB_SOURCES: dict[str, str] = {
    "gsm8k": "openai/gsm8k (config main)",
    "math500": "HuggingFaceH4/MATH-500",
    "math": "EleutherAI/hendrycks_math (all subjects)",
}
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_HINT = {"gsm8k": " (no `####` line)", "math": " (no balanced \\boxed{})"}


@dataclass(frozen=True)
class Record:
    """One question: a stable unique `id`, the `question` text and the raw `gold` answer."""

    id: str
    question: str
    gold: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "question": self.question, "gold": self.gold}


@dataclass(frozen=True)
class _Format:
    """A source format: its question field, how to find the gold, and its own id."""

    name: str
    question: str
    answer: str
    gold: Callable[[str], str | None]
    own_id: Callable[[Mapping[str, Any]], Any]


def _gsm8k_gold(answer: str) -> str | None:
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip()
    return gold.replace(",", "") if _THOUSANDS.fullmatch(gold) else gold


def _college_math_id(row: Mapping[str, Any]) -> str | None:
    source, number = row.get("data_source"), row.get("question_number")
    if source is None or number is None:
        return None
    return f"{str(source).removeprefix('college_math.')}_{number}"


def _first_final_answer(answer: Any) -> str | None:
    """OlympiadBench's gold: the first entry of its `final_answer` list."""
    if isinstance(answer, list):
        return str(answer[0]).strip() if answer and str(answer[0]).strip() else None
    return str(answer).strip() or None


def _math500_id(row: Mapping[str, Any]) -> str | None:
    uid = row.get("unique_id")
    return None if uid is None else str(uid).removeprefix("test/").removesuffix(".json")


FORMATS: dict[str, _Format] = {
    "gsm8k": _Format("gsm8k", "question", "answer", _gsm8k_gold, lambda row: row.get("idx")),
    "math500": _Format("math500", "problem", "answer", str.strip, _math500_id),
    "math": _Format("math", "problem", "solution", extract_boxed, lambda row: None),
    "college_math": _Format("college_math", "question", "answer", str.strip, _college_math_id),
    # Formats named after their dataset: chosen by the dataset's name, not detected.
    "minerva_math": _Format(
        "minerva_math", "problem", "solution", extract_boxed, lambda row: row.get("idx")
    ),
    "olympiadbench": _Format(
        "olympiadbench", "question", "final_answer", _first_final_answer, lambda r: r.get("id")
    ),
    "aime24": _Format("aime24", "problem", "answer", str.strip, lambda row: row.get("id")),
    "amc23": _Format("amc23", "question", "answer", str.strip, lambda row: row.get("id")),
}
NAMED_FORMATS = ("minerva_math", "olympiadbench", "aime24", "amc23")
# How messages describe the formats `detect_format` tells apart (docs/datasets.md).
FORMAT_WORDS = {
    "gsm8k": "GSM8K format (question, and an answer ending in a '#### GOLD' line)",
    "college_math": "College Math format (question, and the gold answer as answer, no '####')",
    "math500": "MATH-500 format (problem, and the gold answer as answer)",
    "math": "MATH format (problem, and a solution with the gold answer in its last \\boxed{})",
}


def detect_format(row: Mapping[str, Any]) -> str:
    """Name of the source format of one raw row (keys of `FORMATS`), or "" if unknown: the
    rule docs/datasets.md states, applied to every row of a file."""
    if "problem" in row:
        return "math500" if "answer" in row else "math" if "solution" in row else ""
    if "question" in row and "answer" in row:
        return "gsm8k" if "####" in str(row["answer"]) else "college_math"
    return ""


def dataset_file(name: str, data_dir: str | Path, split: str = "test") -> Path:
    """Path of a local dataset: `data_dir/NAME/SPLIT.jsonl`."""
    return Path(data_dir) / name / f"{split}.jsonl"


def dataset_hash(path: str | Path) -> str:
    """sha256 hex digest of a dataset file, for the run manifest."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read dataset file {path}: {exc.strerror}") from exc
    return digest.hexdigest()


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSONL file."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is fine
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read dataset file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON line ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _text_field(row: Mapping[str, Any], key: str, where: str, what: str) -> str:
    value = row.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: record has no {what} (field {key!r} missing or empty)")
    return value


def _safe_id(value: Any) -> str:
    return _UNSAFE_ID_CHARS.sub("_", str(value)).strip("_")


def parse_rows(
    name: str, rows: Sequence[tuple[str, Mapping[str, Any]]], fmt: str | None = None
) -> list[Record]:
    """Records from raw rows given as (location for messages, row) pairs.

    Every row's format is read by one rule: `fmt` if given, the dataset's own for a dataset
    named after one (`NAMED_FORMATS`), else `detect_format` of that row; a file whose rows are
    in different formats is refused, and a row in none is read in the first row's format (so
    the field it lacks is named). Ids are `NAME-ID` with each row's "id" field (else the
    format's own id) when every row has one and they are unique, else `NAME-INDEX` (0-based
    row index).
    """
    if not rows:
        return []
    fixed = fmt or (name if name in NAMED_FORMATS else None)
    formats = [fixed or detect_format(row) for _, row in rows]
    fmt = formats[0]
    if fmt not in FORMATS:
        raise DataError(
            f"{rows[0][0]}: unknown dataset format with fields {sorted(rows[0][1])}; expected "
            "question+answer (GSM8K `####` or College Math), problem+answer (MATH-500) "
            "or problem+solution (MATH); see docs/datasets.md"
        )
    # a row in no format is read in the first row's, which names the field it lacks
    mixed = next((i for i, found in enumerate(formats) if found not in ("", fmt)), None)
    if mixed is not None:
        raise DataError(
            f"{rows[mixed][0]}: this row is in the {FORMAT_WORDS[formats[mixed]]}, but "
            f"{rows[0][0]} is in the {FORMAT_WORDS[fmt]}; a dataset file holds one format "
            "(docs/datasets.md): fix the row or split the file"
        )
    spec = FORMATS[fmt]
    parsed: list[tuple[str, str]] = []
    for where, row in rows:
        question = _text_field(row, spec.question, where, "question")
        answer = row.get(spec.answer)
        if not isinstance(answer, list):
            answer = _text_field(row, spec.answer, where, "answer")
        gold = spec.gold(answer)
        if not gold:
            raise DataError(
                f"{where}: record has no gold answer in field {spec.answer!r}{_HINT.get(fmt, '')}"
            )
        parsed.append((question, gold))
    own = [row["id"] if "id" in row else spec.own_id(row) for _, row in rows]
    own_ids = [_safe_id(value) for value in own if value is not None]
    if len(own_ids) != len(rows) or len(set(own_ids)) != len(own_ids) or "" in own_ids:
        own_ids = [str(index) for index in range(len(rows))]
    return [
        Record(f"{name}-{own_id}", question, gold)
        for own_id, (question, gold) in zip(own_ids, parsed, strict=True)
    ]


def _load_local(name: str, data_dir: str | Path, split: str) -> list[Record]:
    path = dataset_file(name, data_dir, split)
    if not path.is_file():
        where = "directory" if not path.parent.is_dir() else "file"
        missing = path.parent if where == "directory" else path
        raise DataError(
            f"dataset {name!r}: {where} {missing} not found; set data_dir (in the config) to a "
            f"folder that holds {name}/{split}.jsonl"
        )
    rows = [(f"{path}:{number}", row) for number, row in _read_jsonl(path)]
    if not rows:
        raise DataError(f"dataset file {path} holds no records")
    return parse_rows(name, rows)


def _hub_rows(
    repo: str, config: str | None, split: str, location: str
) -> list[tuple[str, dict[str, Any]]]:
    import datasets as hf_datasets  # lazy: heavy import, needs the network

    try:
        table = hf_datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # any download failure gets the same advice
        raise DataError(
            f"cannot load {repo} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the network or set data_dir (in the config) to a local copy"
        ) from exc
    return [(f"{location}[{index}]", dict(row)) for index, row in enumerate(table)]


def _load_hub(name: str, split: str) -> list[Record]:
    if name == "gsm8k":
        rows = _hub_rows("openai/gsm8k", "main", split, "hf:openai/gsm8k")
        return parse_rows(name, list(rows), fmt="gsm8k")
    if name == "math500":
        rows = _hub_rows("HuggingFaceH4/MATH-500", None, split, "hf:HuggingFaceH4/MATH-500")
        return parse_rows(name, list(rows), fmt="math500")
    if name == "math":
        rows = []
        for subject in MATH_SUBJECTS:
            location = f"hf:EleutherAI/hendrycks_math/{subject}"
            rows.extend(_hub_rows("EleutherAI/hendrycks_math", subject, split, location))
        return parse_rows(name, rows, fmt="math")
    if name in NAMED_FORMATS:
        raise DataError(
            f"dataset {name!r} is read from a local copy in the Qwen2.5-Math harness's format; "
            f"set data_dir (in the config) to a folder that holds {name}/{split}.jsonl"
        )
    if name == "college_math":
        raise DataError(
            "College Math has no copy on the Hugging Face hub; set data_dir (in the config) to a "
            "folder that holds college_math/test.jsonl"
        )
    raise DataError(
        f"unknown dataset {name!r}: the hub datasets are {', '.join(HUB_SOURCES)}; for another "
        f"name set data_dir (in the config) to a folder that holds {name}/{split}.jsonl"
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    ids: Iterable[str] | None = None,
) -> list[Record]:
    """Load dataset `name` from `data_dir/NAME/SPLIT.jsonl`, or from the hub when no data_dir.

    `ids` keeps only those records (in dataset order; an unknown id is an error); `limit` then
    keeps the first `limit` records.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    records = _load_hub(name, split) if data_dir is None else _load_local(name, data_dir, split)
    if ids is not None:
        wanted = list(ids)
        known = {record.id for record in records}
        unknown = [value for value in wanted if value not in known]
        if unknown:
            examples = ", ".join(record.id for record in records[:3])
            raise DataError(
                f"dataset {name!r} has no record with id {', '.join(map(str, unknown[:5]))}"
                f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} unknown); "
                f"valid ids look like {examples}"
            )
        keep = set(wanted)
        records = [record for record in records if record.id in keep]
    return records if limit is None else records[:limit]
