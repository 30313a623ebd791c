"""Agreement of the "authors" grader with the Qwen2.5-Math harness itself, per dataset.

The harness is not a dependency: give a Python interpreter whose environment runs it (the
authors' pin: sympy 1.12, antlr4-python3-runtime 4.11.1, their vendored latex2sympy2 1.9.0 on
the path) and a directory holding a module `ref` with
`harness_verdict(output, example, data_name) -> bool` that calls the harness's own functions
the way its math_eval.py + evaluate.py do: stop words, run_execute, parse_ground_truth twice
(math_eval.py, then evaluate.py on the saved sample), math_equal. latex2sympy2 keeps `x = ...`
assignments in module globals across calls (and rebinds its `var` to a Symbol after reading a
differential), so `ref` sets its globals back to their import-time values before each answer:
every verdict is the one a fresh harness process gives. Cases are tests/grading_corpus.py's answer
styles over the local golds.

  python bench/grader_agreement.py --data-dir DATA --harness-python PY --harness-dir DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from grading_corpus import _styles  # noqa: E402

from rl_circuits.data.datasets import _read_jsonl, dataset_file, parse_rows  # noqa: E402
from rl_circuits.data.grading import grade  # noqa: E402

RUNNER = """
import json, signal, sys
sys.path.insert(0, sys.argv[1])
import ref
def alarm(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, alarm)
for line in open(sys.argv[2]):
    case = json.loads(line)
    signal.alarm(3)
    try:
        verdict = bool(ref.harness_verdict(case["text"], case["example"], case["dataset"]))
    except TimeoutError:
        verdict = False
    except Exception as exc:
        verdict = "error: " + type(exc).__name__
    signal.alarm(0)
    print(json.dumps(verdict), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--harness-python", required=True)
    parser.add_argument("--harness-dir", required=True)
    parser.add_argument("--datasets", default="gsm8k,math500,college_math")
    parser.add_argument("--per-dataset", type=int, default=200)
    args = parser.parse_args()
    cases = []
    for name in args.datasets.split(","):
        path = dataset_file(name, args.data_dir)
        rows = _read_jsonl(path)
        records = parse_rows(name, [(f"{path}:{n}", row) for n, row in rows])
        step = max(len(rows) // args.per_dataset, 1)
        for (_, row), record in list(zip(rows, records, strict=True))[::step][: args.per_dataset]:
            for style, text in _styles(record.gold):
                cases.append(
                    {
                        "dataset": name,
                        "style": style,
                        "text": text,
                        "gold": record.gold,
                        "example": row,
                    }
                )
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(c) + "\n" for c in cases))
        out = subprocess.run(
            [args.harness_python, "-c", RUNNER, args.harness_dir, str(corpus)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    theirs = [json.loads(line) for line in out]
    agree, total, styles = Counter(), Counter(), Counter()
    disagreements = []
    for case, verdict in zip(cases, theirs, strict=True):
        ours = grade(
            case["text"], case["gold"], timeout=3.0, grader="authors", dataset=case["dataset"]
        )
        total[case["dataset"]] += 1
        if ours.correct == verdict:
            agree[case["dataset"]] += 1
        else:
            styles[(case["dataset"], case["style"])] += 1
            disagreements.append(
                (
                    case["dataset"],
                    case["style"],
                    case["text"][-80:],
                    case["gold"],
                    ours.extracted,
                    ours.gold,
                    ours.correct,
                    verdict,
                )
            )
    for name in total:
        print(f"{name}: {agree[name]}/{total[name]} = {agree[name] / total[name]:.4%} agree")
    print(
        f"all: {sum(agree.values())}/{sum(total.values())} = "
        f"{sum(agree.values()) / sum(total.values()):.4%}"
    )
    print("disagreements by style:", dict(styles.most_common()))
    for row in disagreements[:60]:
        print(row)


if __name__ == "__main__":
    main()
