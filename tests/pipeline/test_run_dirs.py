"""A directory that is not a run is never written into, and no command replaces a file it did
not write (issue 22, part 1)."""

import json
import shutil
from pathlib import Path

import pytest
from config_support import write_config

from rl_circuits.cli.main import main
from rl_circuits.errors import StoreError
from rl_circuits.store.run import RunStore


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _config(tmp_path: Path) -> Path:
    """configs/tiny.toml without its tiny_models step: refusals come before any model work."""
    return write_config(tmp_path / "c.toml", {"run": {"tiny_models": ""}})


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_checkpoint_directory_is_refused_as_run_directory_even_with_force(
    tiny_checkpoints, tmp_path, capsys, force
):
    ckpt = Path(shutil.copytree(tiny_checkpoints["Qwen2ForCausalLM"], tmp_path / "ck"))
    before = _snapshot(ckpt)
    assert main(["run", str(_config(tmp_path)), "--run-dir", str(ckpt), *force]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run directory {ckpt} is not a run (no manifest.json)")
    assert "it holds config.json, generation_config.json, model.safetensors" in err
    assert "--force does not change that" in err and len(err.splitlines()) == 1
    assert _snapshot(ckpt) == before  # not even a lock file


def test_run_store_refuses_a_directory_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="it holds notes.txt; nothing is written there"):
        RunStore.open(tmp_path, {"a": 1}, force=True)
    (tmp_path / "manifest.json").write_text('{"format": "something-else/1"}')
    with pytest.raises(StoreError, match="holds a manifest.json that is not an rl-circuits run"):
        RunStore.open(tmp_path, {"a": 1}, force=True)
    with pytest.raises(StoreError, match="notes.txt exists and is not a directory"):
        RunStore.open(tmp_path / "notes.txt", {"a": 1})  # a file: refused too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]


def test_a_run_interrupted_while_being_created_is_still_a_run(tmp_path, monkeypatch):
    """The manifest (the run's marker) is written before anything else, so a run directory
    holding any file of ours is recognised as a run."""
    import rl_circuits.store.manifest as manifest

    real = manifest.write_atomic

    def interrupt_config(path, data, **kwargs):
        if Path(path).name == "config.json":
            raise KeyboardInterrupt
        return real(path, data, **kwargs)

    monkeypatch.setattr(manifest, "write_atomic", interrupt_config)
    with pytest.raises(KeyboardInterrupt):
        RunStore.open(tmp_path / "run", {"a": 1})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "manifest.json"]
    monkeypatch.undo()
    with RunStore.open(tmp_path / "run", {"a": 1}) as store:
        assert store.config == {"a": 1}
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").write_text("")  # only a lock: an empty directory
    RunStore.open(tmp_path / "locked", {"a": 1}).close()


@pytest.mark.parametrize("where", ["cwd", "parent of runs"])
def test_a_directory_full_of_other_files_is_refused(tmp_path, capsys, monkeypatch, where):
    config = _config(tmp_path)
    (tmp_path / "runs" / "tiny-models" / "before").mkdir(parents=True)
    target = "." if where == "cwd" else str(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    assert main(["run", str(config), "--run-dir", target]) == 2
    err = capsys.readouterr().err
    assert "is not a run (no manifest.json) and not empty" in err
    assert _snapshot(tmp_path) == before


def test_empty_run_dir_option_is_refused_not_replaced_by_the_config_one(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["run", str(config), "--run-dir", ""]) == 2
    err = capsys.readouterr().err
    assert "error: run directory '' (--run-dir) names no directory" in err
    assert "leave --run-dir out to use the config's run_dir (runs/tiny)" in err
    assert not (tmp_path / "runs").exists()


def test_tiny_models_never_overwrites_existing_files(tmp_path, capsys):
    mine = tmp_path / "m" / "before" / "config.json"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"mine": true}')
    assert main(["tiny-models", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"tiny-models: {tmp_path / 'm' / 'before'} already exists in {tmp_path / 'm'}" in err
    assert "nothing was written" in err
    assert json.loads(mine.read_text()) == {"mine": True}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["before"]
