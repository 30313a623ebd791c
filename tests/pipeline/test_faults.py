"""Every fault of docs/faults.md, injected and checked through the user-facing path.

Each test runs the CLI (`main([...])`, as `rl-circuits` does) or `load_model`, and checks the
one message the user sees, the exit code, and that nothing already written is lost. Processes
to kill are forked from this one (imports already done), patched to stop at a chosen point.
"""

import dataclasses
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from config_support import merge, tiny_models_overrides, write_config, write_unchecked_config
from fault_support import intercept_writes, score_temp, temp_of

from rl_circuits.cli.main import main
from rl_circuits.errors import CheckpointError, StoreError
from rl_circuits.models.tiny import char_tokenizer
from rl_circuits.store.run import RunStore

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
# Trained tiny models answer "...\boxed{7}"; the long questions get shorter answers from both.
MIXED = [
    ("What is 3+4", 7),
    ("What is 2+5", 7),
    ("What is 9-2", 7),
    ("Compute the sum of three and four please", 7),
    ("What do you get when you add three to four", 7),
    ("What is 2+2", 4),
]
TEMP_FILE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


# --------------------------------------------------------------------------- the tiny world


class World:
    """configs/tiny.toml with its paths moved under `base`, run on the mixed dataset, and its
    reference run `ref`.

    Pair `tiny` answers with up to 48 tokens; `tiny_short` (same models, defined where a config
    runs it) with up to 30, fewer than the after model's usual answer.
    """

    def __init__(self, base: Path):
        self.base = base
        self.models = base / "models"
        self.ref = base / "ref"
        self.config = self.write_config(base / "ref.toml")

    def write_config(
        self,
        path: Path,
        overrides: dict[str, dict[str, Any]] | None = None,
        pairs: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """The world's config with `overrides` and `pairs` (as `config_support.write_config`)."""
        moved, tiny = tiny_models_overrides(self.models)
        standard = {
            "run": {"run_dir": str(self.ref), "datasets": ["mixed"]},
            "select": {"n": 10},
            "generate": {"chunk_size": 2},
            "analyze": {"n_resamples": 50},
        }
        short = {
            "tiny_short": {
                **tiny["tiny"],
                "algorithm": "GRPO",
                "template": "Q: {q}?\nA:",
                "max_new_tokens": 30,
            }
        }
        overrides = merge(moved, standard, overrides)
        return write_config(path, overrides, pairs=merge(tiny, short, pairs))

    def write_unchecked_config(self, path: Path, edits: dict[str, Any]) -> Path:
        """The reference config with `edits` set unchecked (`config_support`): a bad config."""
        return write_unchecked_config(path, edits, base=self.config)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """Tiny models, the mixed dataset, and one uninterrupted reference run."""
    base = tmp_path_factory.mktemp("faults")
    assert main(["tiny-models", str(base / "models")]) == 0
    data = base / "models" / "data" / "mixed"
    data.mkdir(parents=True)
    lines = [json.dumps({"question": q, "answer": f"#### {a}"}) for q, a in MIXED]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    w = World(base)
    assert main(["run", str(w.config)]) == 0
    return w


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the last line of stderr of one CLI call (progress bars come before it)."""
    capsys.readouterr()
    code = main(argv)
    return code, _last_line(capsys.readouterr().err)


def _last_line(text: str) -> str:
    """The last line: the message ends the output, after every progress bar is closed."""
    assert text.endswith("\n"), text
    return text[:-1].rsplit("\n", 1)[-1] + "\n"


STAGE_DIRS = {
    "grade": ("datasets", "generate", "grade"),
    "select": ("datasets", "generate", "grade", "select"),
}


def _copy_run(world: World, dst: Path, upto: str) -> Path:
    """A new run directory holding the reference run's outputs and markers up to `upto`, and
    its manifest (what makes a directory a run)."""
    (dst / "stages").mkdir(parents=True)
    shutil.copy2(world.ref / "manifest.json", dst / "manifest.json")
    for stage in STAGE_DIRS[upto]:
        shutil.copytree(world.ref / stage, dst / stage)
        shutil.copy2(world.ref / "stages" / f"{stage}.json", dst / "stages" / f"{stage}.json")
        if (world.ref / "stages" / stage).is_dir():
            shutil.copytree(world.ref / "stages" / stage, dst / "stages" / stage)
    return dst


def _snapshot(run_dir: Path, under: str = "") -> dict[str, object]:
    """Every file's bytes (stage markers without their time), less manifest.json and .lock."""
    out: dict[str, object] = {}
    for path in sorted((run_dir / under).rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if not path.is_file() or rel in ("manifest.json", ".lock"):
            continue
        data = path.read_bytes()
        if rel.startswith("stages/"):
            marker = json.loads(data)
            marker.pop("completed_at")
            out[rel] = marker
        else:
            out[rel] = data
    return out


def _temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if TEMP_FILE.match(p.name)]


def _copy_model(world: World, dst: Path, role: str = "before") -> Path:
    shutil.copytree(world.models / role, dst)
    return dst


# --------------------------------------------------------------------------- forked children


def _child(argv: list[str], log: Path, patch) -> None:
    """Body of a forked `rl-circuits ARGV` process: output to `log`, `patch` applied first."""
    out = open(log, "w", buffering=1)  # open until the process exits
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    patch()
    sys.exit(main(argv))


def _fork(argv: list[str], log: Path, patch):
    _stop_tqdm_monitor()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, log, patch))
    proc.start()
    return proc


def _stop_tqdm_monitor() -> None:
    """No thread may hold a lock across fork: tqdm's monitor thread takes tqdm's lock."""
    import tqdm.auto
    import tqdm.std

    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        cls.monitor_interval = 0  # no new monitor thread (it only nudges stalled bars)
        monitor = cls.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None
    assert not [t for t in threading.enumerate() if t.name == "tqdm_monitor"]


def _hang(flag: Path) -> None:
    """Signal the parent that the chosen point is reached, then wait to be killed."""
    flag.touch()
    time.sleep(120)


def _wait_for(flag: Path, proc, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        assert proc.is_alive(), f"child exited ({proc.exitcode}) early:\n{log.read_text()}"
        assert time.monotonic() < deadline, "child never reached its stopping point"
        time.sleep(0.02)


def _kill(proc, sig: int) -> int:
    os.kill(proc.pid, sig)
    proc.join(60)
    return proc.exitcode


# --------------------------------------------------------------------------- models


def test_missing_model_path_or_config_is_named_before_loading(world, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, err = _run(["check-model", str(missing)], capsys)
    assert code == 2
    assert f"model path '{missing}' does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    code, err = _run(["check-model", str(empty)], capsys)
    assert code == 2
    assert f"model directory '{empty}' has no config.json" in err
    # In a run: the generate stage names the path before generating anything.
    config = world.write_config(tmp_path / "c.toml", pairs={"tiny": {"before": str(missing)}})
    code, err = _run(["run", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.startswith("error: ") and f"'{missing}' does not exist" in err
    assert not (tmp_path / "run" / "generate").exists()


def test_truncated_or_corrupted_safetensors_is_refused_before_building(
    world, tmp_path, capsys, monkeypatch
):
    import rl_circuits.models.loading as loading
    from rl_circuits.data.generation import HFGenerator
    from rl_circuits.models.loading import load_model

    built = []
    real_init = loading.HookedTransformer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(loading.HookedTransformer, "__init__", counting_init)
    ckpt = _copy_model(world, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    for damaged, reason in (
        (data[: len(data) // 2], "file not fully covered"),  # truncated download
        (b"\xff" * 8 + data[8:], "header too large"),  # corrupted header
    ):
        weights.write_bytes(damaged)
        with pytest.raises(CheckpointError) as err:
            load_model(ckpt, device="cpu")
        assert f"weight file {weights} is truncated or corrupted" in str(err.value)
        assert reason in str(err.value) and "download it again" in str(err.value)
        with pytest.raises(CheckpointError, match=re.escape(f"weight file {weights} is trunc")):
            HFGenerator(str(ckpt))  # the generate stage's loader
        code, err_text = _run(["check-model", str(ckpt)], capsys)
        assert code == 2 and f"weight file {weights} is truncated or corrupted" in err_text
    assert built == []  # refused before any model was built: no partial model


def _evil_pickle(path: Path, flag: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    torch.save({"model.embed_tokens.weight": Evil()}, path)


def test_pickle_only_checkpoint_is_refused_and_its_code_never_runs(world, tmp_path, capsys):
    from rl_circuits.models.loading import load_model

    ckpt = _copy_model(world, tmp_path / "pickled")
    (ckpt / "model.safetensors").unlink()
    flag = tmp_path / "pickle-code-ran"
    _evil_pickle(ckpt / "pytorch_model.bin", flag)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, device="cpu")
    message = str(err.value)
    assert "only pickle weights (pytorch_model.bin)" in message
    assert "Unpickling can run arbitrary code" in message and "model.allow_pickle" in message
    code, err_text = _run(["check-model", str(ckpt)], capsys)
    assert code == 2 and "only pickle weights" in err_text
    # In a run: refused by the generate stage before any generation.
    config = world.write_config(tmp_path / "c.toml", pairs={"tiny": {"before": str(ckpt)}})
    code, err_text = _run(["run", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "only pickle weights" in err_text
    assert not list((tmp_path / "run").glob("generate/**/*.jsonl"))
    # Even when allowed, pickles are read with weights_only: the payload is refused, not run.
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        load_model(ckpt, device="cpu", allow_pickle=True)
    assert not flag.exists()
    _assert_payload_runs(ckpt / "pytorch_model.bin", flag)


def _assert_payload_runs(path: Path, flag: Path) -> None:
    """Control: a plain unpickling of the file does run its code."""
    torch.load(path, weights_only=False)
    assert flag.exists()


def test_unsupported_architecture_is_refused_listing_the_supported(world, tmp_path, capsys):
    from rl_circuits.models.loading import model_maps

    ckpt = _copy_model(world, tmp_path / "gpt2ish", "after")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    code, err = _run(["check-model", str(ckpt)], capsys)
    assert code == 2
    assert f"unsupported architecture 'GPT2LMHeadModel' in {ckpt / 'config.json'}" in err
    supported = sorted(model_maps())
    assert len(supported) >= 3 and f"supported: {', '.join(supported)}" in err
    # In a run: refused before any model generates (not after hours of generation).
    run_config = world.write_config(tmp_path / "c.toml", pairs={"tiny": {"after": str(ckpt)}})
    code, err = _run(["run", str(run_config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "unsupported architecture 'GPT2LMHeadModel'" in err
    assert not (tmp_path / "run" / "generate").exists()


def test_tokenizer_larger_than_the_embedding_is_refused(world, tmp_path, capsys):
    from rl_circuits.models.loading import load_model

    ckpt = _copy_model(world, tmp_path / "bigtok")
    tokenizer = char_tokenizer(extra_tokens=("<x1>", "<x2>", "<x3>"))
    tokenizer.save_pretrained(ckpt)
    rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert len(tokenizer) == rows + 3
    expected = f"has {len(tokenizer)} tokens but the model's embedding has only {rows} rows"
    with pytest.raises(CheckpointError, match=expected):
        load_model(ckpt, device="cpu")
    code, err = _run(["check-model", str(ckpt)], capsys)
    assert code == 2 and f"tokenizer in {ckpt}" in err and expected in err
    # In a run: the generate stage refuses it too (its ids would overrun the embedding).
    config = world.write_config(tmp_path / "c.toml", pairs={"tiny": {"before": str(ckpt)}})
    code, err = _run(["run", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and err == f"error: tokenizer in {ckpt} {expected}; the tokenizer does " + (
        "not belong to this model.\n"
    )
    assert not list((tmp_path / "run").glob("generate/**/*.jsonl"))


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "edits,expected",
    [
        ({"select": {"colour": 1}}, "select.colour is not a known key; allowed: n,"),
        (
            {"attribute": {"batch_size": "two"}},
            "attribute.batch_size must be an int (>= 1), got 'two'",
        ),
        (
            {"select": {"alphas": [0.0, 1.0]}},
            "select.alphas = [0.0, 1.0] is out of range: must be a non-empty list of numbers "
            "in (0, 1]",
        ),
        (
            {"select": {"alphas": [0.3, 2.0]}},
            "select.alphas = [0.3, 2.0] is out of range: must be a non-empty list of numbers "
            "in (0, 1]",
        ),
        (
            {"select": {"alphas": [0.3, 0.30000001, 1.0]}},
            "select.alphas = [0.3, 0.30000001, 1.0] lists alpha 0.3 more than once",
        ),
        ({"run": {"datasets": ["mixed", "mixed"]}}, "datasets lists 'mixed' more"),
        ({"run": {"pairs": ["tiny", "tiny"]}}, "pairs lists 'tiny' more than once"),
        (
            {"run": {"ids": ["7"]}},
            "ids entry '7' names no dataset of this run: an id is DATASET-ID with DATASET among "
            "mixed (e.g. 'mixed-12')",
        ),
        ({"run": {"ids": ["sevens-1"]}}, "ids entry 'sevens-1'"),
        (
            {"tiny_models": "x"},  # at the top level, besides [run]'s
            "tiny_models is set both at the top level and in [run]; keep one",
        ),
        (
            {"select": {"beta": 5.0}},
            "select.beta = 5.0 > select.gamma = 3.0; the length window needs beta <= gamma",
        ),
        ({"select": {"delta": 1.5}}, "select.delta = 1.5 is out of range: must be in (0, 1]"),
        ({"select": {"delta": 0.0}}, "select.delta = 0.0 is out of range: must be in (0, 1]"),
        ({"select": {"n": 0}}, "select.n = 0 is out of range: must be >= 2"),
        ({"select": {"n": 1}}, "select.n = 1 is out of range: must be >= 2"),
        (
            {"select": {"gamma": float("inf")}},
            "select.gamma = inf must be a finite number (> 0)",
        ),
    ],
)
def test_bad_config_is_refused_naming_key_and_range(world, tmp_path, capsys, edits, expected):
    config = world.write_unchecked_config(tmp_path / "c.toml", edits)
    run_dir = tmp_path / "run"
    code, err = _run(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 2
    assert err.startswith(f"error: {config}: {expected}"), err
    assert not run_dir.exists()  # validated before the run directory is touched


def test_malformed_dataset_line_is_named_by_file_and_line(world, tmp_path, capsys):
    data = tmp_path / "data" / "mixed" / "test.jsonl"
    data.parent.mkdir(parents=True)
    config = world.write_config(tmp_path / "c.toml", {"run": {"data_dir": str(tmp_path / "data")}})
    run_dir = tmp_path / "run"
    good = json.dumps({"question": "What is 3+4", "answer": "#### 7"})
    for body, expected in (
        (f'{good}\n{good}\n{{"question": "What is 2+5", "answer": \n', f"{data}:3: malformed JSON"),
        (f'{good}\n{{"question": "What is 2+5"}}\n{good}\n', f"{data}:2: record has no answer"),
        (f'{good}\n{{"answer": "#### 7"}}\n', f"{data}:2: record has no question"),
    ):
        data.write_text(body)
        code, err = _run(["datasets", str(config), "--run-dir", str(run_dir)], capsys)
        assert code == 2 and err.startswith(f"error: {expected}"), err
        assert not (run_dir / "datasets").exists()


def test_empty_selection_stops_with_the_count_each_filter_removed(world, tmp_path, capsys):
    run_dir = _copy_run(world, tmp_path / "run", "grade")
    config = world.write_config(tmp_path / "c.toml", {"select": {"delta": 0.01}})
    code, err = _run(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 2
    match = re.search(
        r"error: pair tiny, dataset mixed: no question survives selection: 6 entered, "
        r"both_correct removed (\d+), equal_prompt_len removed 0, length_window removed (\d+), "
        r"balance removed (\d+)\. Check the grading",
        err,
    )
    assert match, err
    # The counts come from the run's own grades: every question is removed by some filter.
    correct = [
        {g["id"] for g in _records(world, "grade", "tiny", role) if g["verdict"] == "correct"}
        for role in ("before", "after")
    ]
    both = len(correct[0] & correct[1])
    removed = [int(n) for n in match.groups()]
    assert removed[0] == 6 - both and both > 0 and sum(removed) == 6 and removed[2] > 0
    assert not (run_dir / "select").exists() and not (run_dir / "attribute").exists()
    assert not list(run_dir.rglob("*.safetensors"))  # no empty score files


# --------------------------------------------------------------------------- data


def _model_key(world: World, pair: str, role: str) -> str:
    from rl_circuits.config import load_config
    from rl_circuits.models.pairs import PairModel

    return PairModel(load_config(world.config).pairs[pair], role).key


def _records(world: World, stage: str, pair: str, role: str) -> list[dict]:
    """The reference run's generate or grade records of one model."""

    key = _model_key(world, pair, role)
    return RunStore.read_only(world.ref).records(f"{stage}/{key}/mixed").load()


def test_answer_cut_at_the_token_limit_is_graded_no_answer(world, tmp_path, capsys):
    from rl_circuits.config import load_config
    from rl_circuits.models.pairs import PairModel
    from rl_circuits.store.run import RunStore

    # Pair tiny_short stops answers at 30 tokens: the after model's usual answer has 39.
    short = {"run": {"pairs": ["tiny_short"]}}
    config = world.write_config(tmp_path / "short.toml", short)
    run_dir = tmp_path / "run"
    for stage in ("datasets", "generate", "grade"):
        assert main([stage, str(config), "--run-dir", str(run_dir)]) == 0
    store, pair = RunStore.read_only(run_dir), load_config(config).pairs["tiny_short"]
    records = {
        role: {
            stage: store.records(f"{stage}/{PairModel(pair, role).key}/mixed").load()
            for stage in ("generate", "grade")
        }
        for role in ("before", "after")
    }
    grades = {g["id"]: g for g in records["after"]["grade"]}
    cut = [g for g in records["after"]["generate"] if g["finish_reason"] == "length"]
    assert cut and all(len(g["answer_ids"]) == 30 for g in cut)
    for g in cut:
        assert grades[g["id"]]["verdict"] == "no_answer" and grades[g["id"]]["extracted"] is None
    # Selection goes on with the questions both models answered correctly within the limit,
    # or, where none is left, says how many the cut answers removed.
    both = {g["id"] for g in records["before"]["grade"] if g["verdict"] == "correct"} & {
        i for i, g in grades.items() if g["verdict"] == "correct"
    }
    assert not both & {g["id"] for g in cut}
    capsys.readouterr()
    code = main(["select", str(config), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    if both:
        assert code == 0
        selection = json.loads((run_dir / "select" / "tiny_short" / "mixed.json").read_text())
        assert selection["ids"] and set(selection["ids"]) <= both
    else:
        assert code == 2
        assert "no question survives selection: 6 entered, both_correct removed 6" in err


def test_t_cut_longer_than_an_answer_skips_the_question_in_both_models(world, tmp_path):
    from rl_circuits import load_run

    # With the mean of both models' lengths as reference, T_cut at alpha = 1 exceeds the
    # before model's usual answer (23 tokens against the after model's 39).
    run_dir = _copy_run(world, tmp_path / "run", "grade")
    mean = {"select": {"reference": "mean"}}
    config = world.write_config(tmp_path / "mean.toml", mean)
    for stage in ("select", "attribute"):
        assert main([stage, str(config), "--run-dir", str(run_dir)]) == 0
    selection = json.loads((run_dir / "select" / "tiny" / "mixed.json").read_text())
    cut = selection["t_cut"]["1.0"]
    gens = {
        role: {g["id"]: g for g in _records(world, "generate", "tiny", role)}
        for role in ("before", "after")
    }
    # A question that either model answered in fewer than T_cut tokens is skipped for both.
    reasons = {
        qid: f"the {role} model's answer has {n} tokens, fewer than T_cut = {cut}"
        for qid in selection["ids"]
        for role in ("before", "after")
        if (n := len(gens[role][qid]["answer_ids"])) < cut
    }
    assert reasons
    kept = [i for i in selection["ids"] if i not in reasons]
    run = load_run(run_dir)
    for role in ("before", "after"):
        where = run_dir / "attribute" / "tiny" / role / "mixed"
        skipped = json.loads((where / "alpha-1" / "skipped.json").read_text())
        assert skipped == reasons  # the same for both models
        assert json.loads((where / "alpha-0.3" / "skipped.json").read_text()) == {}
        assert run.scores("tiny", role, "mixed", 0.3).ids == selection["ids"]
        if kept:
            assert run.scores("tiny", role, "mixed", 1.0).ids == kept


def test_nan_scores_fail_naming_question_and_stage(world, tmp_path, capsys, monkeypatch):
    import rl_circuits.models.loading as loading

    run_dir = _copy_run(world, tmp_path / "run", "select")
    real = loading.load_model

    def overflowing(path, **kwargs):
        model = real(path, **kwargs)
        if Path(path).name == "after":  # logits overflow to inf: the loss becomes NaN
            model.unembed.W_U.data.mul_(torch.finfo(torch.float32).max)
        return model

    monkeypatch.setattr(loading, "load_model", overflowing)
    code, err = _run(["attribute", str(world.config), "--run-dir", str(run_dir)], capsys)
    assert code == 2
    match = re.fullmatch(
        r"error: attribute stage: question (mixed-\d) of mixed: loss nan or its eap scores are "
        r"NaN/inf during attribution; float16 overflows easily: load the model in float32 or "
        r"bfloat16.\n",
        err,
    )
    assert match and match.group(1) in ("mixed-0", "mixed-1", "mixed-2", "mixed-3", "mixed-4")
    # The before model's finished scores are kept, identical; nothing of the after model.
    before = "attribute/tiny/before"
    assert _snapshot(run_dir, before) == _snapshot(world.ref, before)
    assert not list((run_dir / "attribute" / "tiny" / "after").rglob("*.safetensors"))


# --------------------------------------------------------------------------- process


def _patch_half_write(target: str, flag: Path):
    """Hang half-way through writing `target` (relative to the run): its temp file is half full."""

    def write(path, fd, data, real_write):
        real_write(fd, data[: len(data) // 2])
        _hang(flag)

    return lambda: intercept_writes(temp_of(target), write)


def _patch_after_calls(module, name: str, calls: int, flag: Path):
    """Hang on call number `calls` of module.name (a function or a generator function)."""
    real = getattr(module, name)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            _hang(flag)
        return real(*args, **kwargs)

    return lambda: setattr(module, name, wrapper)


def test_sigkill_in_any_stage_resumes_to_identical_outputs(world, tmp_path):
    import rl_circuits.pipeline.grade as grade_stage

    key = _model_key(world, "tiny", "before")
    run_dir = tmp_path / "run"
    argv = ["run", str(world.config), "--run-dir", str(run_dir)]
    # (stage, file being written when killed, or (function, call number) killed in)
    kills = [
        ("datasets", "datasets/mixed.jsonl"),
        ("generate", f"generate/{key}/mixed/chunks/00002.jsonl"),
        ("grade", (grade_stage, "grade", 9)),
        ("select", "select/tiny/mixed.json"),
        ("attribute", (RunStore, "write_scores", 4)),
        ("analyze", "analysis/table1.md"),
    ]
    for stage, point in kills:
        flag, log = tmp_path / f"{stage}.flag", tmp_path / f"{stage}.log"
        if isinstance(point, str):
            patch = _patch_half_write(point, flag)
        else:
            patch = _patch_after_calls(*point, flag)
        proc = _fork(argv, log, patch)
        _wait_for(flag, proc, log)
        assert _kill(proc, signal.SIGKILL) == -signal.SIGKILL
        assert not (run_dir / "stages" / f"{stage}.json").exists()  # killed part way
        if isinstance(point, str):  # mid-write: a half-written hidden temp file, no target
            (temp,) = _temp_files(run_dir)
            assert temp.parent == (run_dir / point).parent
            assert temp.name.startswith(f".{Path(point).name}.tmp-") and temp.stat().st_size
            assert not (run_dir / point).exists()
        else:
            assert not _temp_files(run_dir)
        if stage == "generate":
            assert (run_dir / point).with_name("00001.jsonl").is_file()
        if stage == "grade":  # one of the two models graded, the second part way
            assert len(list(run_dir.glob("grade/*/mixed/records.jsonl"))) == 1
        if stage == "attribute":
            # Three score files were written before the kill, in the fourth call.
            assert len(list(run_dir.glob("attribute/**/q/*.safetensors"))) == 3
    assert main(argv) == 0
    assert not _temp_files(run_dir)
    resumed, reference = _snapshot(run_dir), _snapshot(world.ref)
    assert sorted(resumed) == sorted(reference)
    assert "report/report.html" in reference and "analysis/table1.md" in reference
    for rel, data in reference.items():
        assert resumed[rel] == data, rel


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(world, tmp_path):
    run_dir = _copy_run(world, tmp_path / "run", "select")
    flag, log = tmp_path / "flag", tmp_path / "log"

    def write(path, fd, data, real_write):  # Ctrl-C arrives while a score file is being written
        real_write(fd, b"partial")
        _hang(flag)

    argv = ["attribute", str(world.config), "--run-dir", str(run_dir)]
    proc = _fork(argv, log, lambda: intercept_writes(score_temp, write))
    _wait_for(flag, proc, log)
    assert _kill(proc, signal.SIGINT) == 130
    assert _last_line(log.read_text()) == (
        "interrupted: finished work is saved; run the same command again to resume.\n"
    )
    assert not _temp_files(run_dir)  # the half-written file is gone
    assert not list(run_dir.glob("attribute/**/*.safetensors"))
    assert main(argv) == 0
    assert _snapshot(run_dir, "attribute") == _snapshot(world.ref, "attribute")


def test_second_process_on_a_run_is_refused_and_the_first_is_unharmed(world, tmp_path, capsys):
    run_dir = _copy_run(world, tmp_path / "run", "select")
    flag, go, log = tmp_path / "flag", tmp_path / "go", tmp_path / "log"
    real = RunStore.write_scores

    def paused_write(self, *args, **kwargs):  # the first process waits half-way for the second
        flag.touch()
        while not go.exists():
            time.sleep(0.01)
        return real(self, *args, **kwargs)

    argv = ["attribute", str(world.config), "--run-dir", str(run_dir)]
    proc = _fork(argv, log, lambda: setattr(RunStore, "write_scores", paused_write))
    _wait_for(flag, proc, log)
    for second in (argv, ["run", *argv[1:]]):
        code, err = _run(second, capsys)
        assert code == 2
        assert f"error: run directory {run_dir} is locked by process {proc.pid}" in err
        assert "only one process may write a run at a time" in err
    go.touch()
    proc.join(120)
    assert proc.exitcode == 0, log.read_text()
    assert _snapshot(run_dir, "attribute") == _snapshot(world.ref, "attribute")


def test_disk_full_fails_the_stage_and_keeps_written_files(world, tmp_path, capsys, monkeypatch):
    run_dir = _copy_run(world, tmp_path / "run", "select")
    argv = ["attribute", str(world.config), "--run-dir", str(run_dir)]
    before = _snapshot(run_dir)
    started: list[Path] = []

    def write(path, fd, data, real_write):
        if path not in started:
            started.append(path)
        if len(started) == 3:  # the third score file: disk full after its first 100 bytes
            real_write(fd, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    intercept_writes(score_temp, write, monkeypatch.setattr)
    code, err = _run(argv, capsys)
    assert code == 2
    match = re.fullmatch(
        r"error: could not write (attribute/\S+/q/mixed-\d\.safetensors) in run directory "
        + re.escape(str(run_dir.resolve()))
        + r": disk full \(no space left on device\)\. The previous version of the file, if any, "
        r"is unchanged\.\n",
        err,
    )
    assert match, err
    assert not (run_dir / match.group(1)).exists() and not _temp_files(run_dir)
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier files intact
    new = sorted(set(after) - set(before))
    assert len([n for n in new if "/q/" in n]) == 2
    for rel in new:  # what the stage wrote before the failure is complete and correct
        assert after[rel] == (world.ref / rel).read_bytes(), rel
    monkeypatch.undo()
    assert main(argv) == 0
    assert _snapshot(run_dir, "attribute") == _snapshot(world.ref, "attribute")


def test_cuda_out_of_memory_retries_smaller_batches(world, tmp_path, capsys, monkeypatch):
    import rl_circuits.engine.attribution as attribution

    real = attribution.attribute
    sizes: list[tuple[int, bool]] = []
    always = [True]

    def oom(model, tokens, *args, **kwargs):
        failed = always[0] or tokens.shape[0] > 1
        sizes.append((tokens.shape[0], failed))
        if failed:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(attribution, "attribute", oom)
    run_dir = _copy_run(world, tmp_path / "run", "select")
    argv = ["attribute", str(world.config), "--run-dir", str(run_dir)]
    code, err = _run(argv, capsys)  # out of memory even at batch size 1
    assert code == 2
    match = re.fullmatch(
        r"error: CUDA out of memory attributing question (mixed-\d) of mixed \((\d+) tokens\) "
        r"at batch size 1\. Options: attribute.efficient_attention = true, attribute.checkpoint "
        r"= true, model.n_devices > 1, or a smaller alpha\.\n",
        err,
    )
    assert match, err
    assert sizes == [(2, True), (1, True)]
    gens = {g["id"]: g for g in _records(world, "generate", "tiny", "before")}
    selection = json.loads((world.ref / "select" / "tiny" / "mixed.json").read_text())
    width = len(gens[match.group(1)]["prompt_ids"]) + selection["t_cut"]["0.3"]
    assert int(match.group(2)) == width  # the sequence length of that question
    # Out of memory only above batch size 1: every batch of 2 is retried as two of 1.
    always[0], sizes[:] = False, []
    assert main(argv) == 0
    assert (2, True) in sizes and all(n == 1 for n, failed in sizes if not failed)
    monkeypatch.undo()
    batch1 = _copy_run(world, tmp_path / "batch1", "select")
    config = world.write_config(tmp_path / "batch1.toml", {"attribute": {"batch_size": 1}})
    assert main(["attribute", str(config), "--run-dir", str(batch1)]) == 0
    retried = _snapshot(run_dir, "attribute")
    # One score file per scored question and cell: as many as the reference run wrote.
    expected = _snapshot(world.ref, "attribute")
    n_scores = sum(rel.endswith(".safetensors") for rel in expected)
    assert n_scores and sum(rel.endswith(".safetensors") for rel in retried) == n_scores
    assert retried == _snapshot(batch1, "attribute")


# --------------------------------------------------------------------------- security


def test_security_weights_only_from_safetensors_by_default(world, tmp_path, capsys):
    ckpt = _copy_model(world, tmp_path / "both")
    flag = tmp_path / "pickle-code-ran"
    _evil_pickle(ckpt / "pytorch_model.bin", flag)  # next to the safetensors file
    code, _ = _run(["check-model", str(ckpt)], capsys)  # loads with TransformerLens and HF
    assert code == 0 and not flag.exists()
    from rl_circuits.data.generation import HFGenerator

    HFGenerator(str(ckpt))  # the generate stage's loader
    assert not flag.exists()
    _assert_payload_runs(ckpt / "pytorch_model.bin", flag)


def test_security_auto_map_is_ignored_and_never_imported(world, tmp_path, capsys):
    ckpt = _copy_model(world, tmp_path / "remote")
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    tok = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok))
    flags = []
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        flags.append(tmp_path / f"{module}-imported")
        (ckpt / f"{module}.py").write_text(
            f"open({str(flags[-1])!r}, 'w').close()\n"
            "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: pass\n"
        )
    capsys.readouterr()
    assert main(["check-model", str(ckpt)]) == 0  # our map and Hugging Face's own class
    assert "(Qwen2ForCausalLM, 2 layers)" in capsys.readouterr().out
    from rl_circuits.data.generation import HFGenerator

    generator = HFGenerator(str(ckpt))
    assert type(generator.model).__name__ == "Qwen2ForCausalLM"
    assert not any(flag.exists() for flag in flags)
    # Control: importing one of those modules does create its file.
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_evil", ckpt / "modeling_evil.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert flags[1].exists()


def test_security_grading_never_evaluates_model_output(tmp_path):
    from rl_circuits.data.grading import grade

    flag = tmp_path / "X"
    for response in (
        f"\\boxed{{__import__('os').system('touch {flag}')}}",
        f"The answer is: __import__('os').system('touch {flag}')",
        f"\\boxed{{exec(\"open('{flag}', 'w')\")}}",
        f"The answer is eval(\"__import__('os').system('touch {flag}')\")",
    ):
        result = grade(response, "7", timeout=5)
        assert result.verdict in ("incorrect", "ungradable"), result
        assert "__import__" in result.extracted or "exec" in result.extracted
    assert not flag.exists()
    eval(grade(f"\\boxed{{__import__('os').system('touch {flag}')}}", "7").extracted)
    assert flag.exists()  # control: evaluating what was extracted would have run it


def test_security_grading_timeout_works_outside_main_thread(monkeypatch):
    import rl_circuits.data.grading as grading

    results = {}

    def in_thread(name, response, gold, timeout):
        start = time.monotonic()
        results[name] = (grading.grade(response, gold, timeout=timeout), time.monotonic() - start)

    worker = threading.Thread(target=in_thread, args=("real", "\\boxed{14/2}", "7", 5))
    worker.start()
    worker.join()
    assert results["real"][0].verdict == "correct"  # math-verify itself, off the main thread

    def hang(*args, **kwargs):  # a comparison that never ends (sympy's worst cases)
        while True:
            pass

    import math_verify

    monkeypatch.setattr(math_verify, "verify", hang)
    worker = threading.Thread(target=in_thread, args=("hang", "\\boxed{14/2}", "7", 0.3))
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    result, seconds = results["hang"]
    assert result.verdict == "ungradable" and result.error == "math-verify timed out after 0.3 s"
    assert seconds < 3
    deadline = time.monotonic() + 5  # the hung grader thread is stopped, not left spinning
    while any(t.name == "rl-circuits-grade" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_security_names_cannot_write_outside_the_run(world, tmp_path, capsys):
    from rl_circuits.config import load_config
    from rl_circuits.models.pairs import Pair
    from rl_circuits.pipeline.select import stage_select
    from rl_circuits.store.run import RunStore

    run_dir = tmp_path / "inside" / "run"
    tiny = load_config(world.config).pairs["tiny"]
    evil_pair = {k: v for k, v in vars(tiny).items() if k != "name" and v is not None and v != ()}
    for edits, name in (
        ({"run": {"datasets": ["../escape"]}}, "datasets entry '../escape'"),
        (
            {"run": {"pairs": ["../evil"]}, "pairs_inline": {"../evil": evil_pair}},
            "pairs entry '../evil'",
        ),
    ):
        config = world.write_unchecked_config(tmp_path / "c.toml", edits)
        code, err = _run(["run", str(config), "--run-dir", str(run_dir)], capsys)
        assert code == 2
        assert err.startswith(f"error: {config}: {name} is not a plain name")
        assert "without '/' or '..'" in err
    assert not (tmp_path / "inside").exists()
    # Behind the config check, the store itself refuses a path leaving the run directory.
    cfg = load_config(world.config)
    pair = cfg.pairs["tiny"]
    fields = {k: v for k, v in vars(pair).items() if k != "name"}
    evil = dataclasses.replace(cfg, pairs={"../evil": Pair(name="../evil", **fields)})
    copy = _copy_run(world, tmp_path / "run", "grade")
    with RunStore.open(copy, cfg.resolved()) as store:
        with pytest.raises(StoreError, match=r"contains '\.\.': nothing is written outside"):
            stage_select(evil, store)
    assert not (tmp_path / "evil").exists() and not (copy / "select").exists()
