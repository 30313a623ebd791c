"""Issue 28: the zoo build pins its numeric environment, so any x86 machine builds the same bytes.

The build trains in a subprocess with AVX2 kernels, MKL's reproducibility mode, one thread
and deterministic algorithms, whatever the caller's shell sets; this is checked by building a
few-step zoo from shells with different `ATEN_CPU_CAPABILITY` values.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl_circuits.zoo import ZooConfig, default_root
from rl_circuits.zoo.build import zoo_digest
from rl_circuits.zoo.numerics import bitwise_note, cpu_flags, kernel_sets, pinned_environment

# A zoo that trains in seconds: 150 SFT steps of a 0.05M-parameter model, 2 GRPO steps, a
# few DPO pairs (enough for some right and some wrong answers).
TINY = """
[zoo.task]
train_size = 400
validation_size = 16
test_size = 16
step_weights = [1.0]
[zoo.model]
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 1
[zoo.sft]
max_steps = 150
min_steps = 150
eval_every = 150
eval_size = 16
warmup_steps = 4
learning_rate = 5e-3
batch_size = 16
[zoo.grpo]
steps = 2
prompts_per_step = 2
num_generations = 4
train_prompts = 8
[zoo.dpo]
pair_prompts = 32
epochs = 1
batch_size = 4
"""
AVX2 = frozenset({"sse2", "avx", "avx2"})
AVX512 = AVX2 | {"avx512f", "avx512bw"}


def test_pinned_environment_selects_avx2_kernels_on_any_avx2_x86():
    env = pinned_environment(machine="x86_64", flags=AVX512, mkl=True)
    assert env == pinned_environment(machine="x86_64", flags=AVX2, mkl=True)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_CBWR"] == "AVX2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert "MKL_CBWR" not in pinned_environment(machine="x86_64", flags=AVX2, mkl=False)
    assert pinned_environment(4, machine="x86_64", flags=AVX2, mkl=True)["OMP_NUM_THREADS"] == "4"


def test_without_avx2_the_build_uses_default_kernels_and_says_so():
    for machine, flags in (("aarch64", frozenset({"asimd"})), ("x86_64", frozenset({"sse2"}))):
        env = pinned_environment(machine=machine, flags=flags, mkl=True)
        assert env["ATEN_CPU_CAPABILITY"] == "default"
        assert "MKL_CBWR" not in env and "ONEDNN_MAX_CPU_ISA" not in env
        note = bitwise_note(machine=machine, flags=flags)
        assert "not bit-identical" in note and "\n" not in note
    assert bitwise_note(machine="x86_64", flags=AVX512) is None


def test_cpu_flags_read_proc_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse2", "avx2"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_environment_is_part_of_the_cache_digest():
    config = ZooConfig()
    one = pinned_environment(1, machine="x86_64", flags=AVX2, mkl=True)
    other = pinned_environment(1, machine="aarch64", flags=frozenset(), mkl=False)
    assert zoo_digest(config, one) != zoo_digest(config, other)
    assert default_root(config, 1) != default_root(config, 2)


def _build(tmp_path: Path, name: str, aten: str | None) -> Path:
    """`rl-circuits zoo build` of the tiny zoo from a shell with ATEN_CPU_CAPABILITY=`aten`."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    env = {**os.environ, "RL_CIRCUITS_HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])])
    env.pop("ATEN_CPU_CAPABILITY", None)
    if aten is not None:
        env["ATEN_CPU_CAPABILITY"] = aten
    root = tmp_path / name
    command = [sys.executable, "-m", "rl_circuits.cli.main", "zoo", "build", "--quiet"]
    command += ["--config", str(config), "--root", str(root), "--no-register"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    return root


@pytest.mark.slow
def test_shells_with_other_kernel_sets_build_identical_checkpoints(tmp_path):
    native = _build(tmp_path, "native", None)
    portable = _build(tmp_path, "portable", "default")
    for stage in ("sft", "grpo", "dpo"):
        first = (native / stage / "model.safetensors").read_bytes()
        assert first == (portable / stage / "model.safetensors").read_bytes(), stage
    manifest = json.loads((native / "zoo.json").read_text())
    assert manifest["environment"] == pinned_environment()
    assert manifest["deterministic"] is True
    expected = "DEFAULT" if manifest["environment"]["ATEN_CPU_CAPABILITY"] == "default" else "AVX2"
    assert manifest["cpu_capability"] == expected


def test_kernel_sets_of_a_cpu_and_forcing_one():
    assert kernel_sets(machine="x86_64", flags=AVX512) == ["default", "avx2", "avx512"]
    assert kernel_sets(machine="x86_64", flags=AVX2) == ["default", "avx2"]
    assert kernel_sets(machine="aarch64", flags=frozenset()) == ["default"]
    env = pinned_environment(kernels="avx512", machine="x86_64", flags=AVX512, mkl=True)
    assert env["ATEN_CPU_CAPABILITY"] == "avx512" and env["MKL_CBWR"] == "AVX512"
    with pytest.raises(ValueError, match="kernels='sse'"):
        pinned_environment(kernels="sse")
