"""Shared fixtures: tiny random checkpoints of every supported architecture (no network)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rl_circuits.models.tiny import ARCHITECTURES, make_tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, object]:
    """architecture name -> directory of a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(params=ARCHITECTURES)
def tiny_checkpoint(request, tiny_checkpoints):
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="module")
def models64(tiny_checkpoints):
    """architecture name -> its tiny checkpoint loaded in float64, for the exactness tests."""
    from rl_circuits.models.loading import load_model

    return {
        arch: load_model(path, dtype=torch.float64, device="cpu", max_seq_len=64)
        for arch, path in tiny_checkpoints.items()
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Tiny trained models + dataset, configs/tiny.toml pointed at them, and one complete run."""
    from config_support import merge, tiny_models_overrides, write_config

    from rl_circuits.cli.main import main

    base = tmp_path_factory.mktemp("pipeline")
    assert main(["tiny-models", str(base / "models")]) == 0
    overrides, pairs = tiny_models_overrides(base / "models")
    overrides = merge(overrides, {"run": {"run_dir": str(base / "run")}})
    config = write_config(base / "tiny.toml", overrides, pairs=pairs)
    assert main(["run", str(config)]) == 0
    return base, config
