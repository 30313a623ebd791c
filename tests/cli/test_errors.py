"""Bad inputs a new user tried get errors naming the input and the fix (issue 18)."""

import json

import numpy as np
import pytest
import torch
from checker import unchecked

from rl_circuits.cli.main import main
from rl_circuits.errors import ConfigError, DataError, RLCircuitsError


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    from rl_circuits.models.loading import load_model

    # dtype as configs spell it
    return load_model(tiny_checkpoints["LlamaForCausalLM"], dtype="float32", device="cpu")


def _inputs(model, pos: int = 6):
    tokens = torch.arange(1, pos + 1).unsqueeze(0) % model.cfg.d_vocab
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, -2:] = True
    return tokens, mask


def test_load_model_dtype_names(model, tiny_checkpoints):
    from rl_circuits.models.loading import as_dtype, load_model

    assert model.cfg.dtype == torch.float32
    assert as_dtype("bfloat16") is torch.bfloat16 and as_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="dtype 'fp32' is not supported; use one of float32"):
        load_model(tiny_checkpoints["LlamaForCausalLM"], dtype="fp32", device="cpu")


def test_unusable_device_is_refused_naming_the_alternative(monkeypatch):
    from rl_circuits.models.loading import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda': this torch has no usable CUDA GPU"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="device 'gpu' is not a torch device; use 'auto'"):
        check_device("gpu")
    assert check_device("auto") == "cpu" and check_device("cpu") == "cpu"


def test_attribute_reads_lists_and_arrays_and_refuses_bad_tokens_by_name(model):
    from rl_circuits.engine.attribution import attribute

    tokens, mask = _inputs(model)
    reference = attribute(model, tokens, mask).values
    # lists and numpy arrays are read as tensors
    assert torch.equal(attribute(model, tokens.tolist(), mask.tolist()).values, reference)
    assert torch.equal(attribute(model, tokens.numpy(), mask.numpy()).values, reference)
    bad = tokens.clone()
    bad[0, 2] = model.cfg.d_vocab
    with pytest.raises(ValueError, match=f"token id {model.cfg.d_vocab} is outside the model's"):
        attribute(model, bad, mask)
    bad[0, 2] = -1
    with pytest.raises(ValueError, match="token id -1 is outside the model's vocabulary"):
        attribute(model, bad, mask)
    with unchecked():  # float tokens: outside the hint, explained by attribute's own check
        with pytest.raises(ValueError, match="tokens must hold integer token ids, got dtype tor"):
            attribute(model, tokens.float(), mask)
    with pytest.raises(ValueError, match="ig_steps must be an integer >= 1, got 0"):
        attribute(model, tokens, mask, method="eap-ig", ig_steps=0)
    with pytest.raises(ValueError, match="tokens must be a tensor, a numpy array or a rect"):
        attribute(model, [[1, 2], [3]], mask)
    long_tokens, long_mask = _inputs(model, model.cfg.n_ctx + 1)
    limit = model.checkpoint_max_positions
    with pytest.raises(ValueError, match=f"exceeds the model's n_ctx {model.cfg.n_ctx}") as info:
        attribute(model, long_tokens, long_mask)
    if model.cfg.n_ctx + 1 > limit:
        assert f"the checkpoint itself allows at most {limit} positions" in str(info.value)
    else:
        assert f"load the model with max_seq_len >= {model.cfg.n_ctx + 1}" in str(info.value)


def test_compare_takes_scores_or_tensors_and_refuses_nan(model):
    from rl_circuits.analysis.stats import compare
    from rl_circuits.engine.attribution import attribute

    tokens, mask = _inputs(model)
    batch = torch.cat([tokens, tokens.roll(1, 1)]), torch.cat([mask, mask])
    before = attribute(model, *batch)
    after = attribute(model, *batch, method="eap-ig", ig_steps=2)
    frame = compare(before, after, n_resamples=20)  # score objects: their values
    same = compare(before.values, after.values, n_resamples=20)
    assert frame.equals(same)
    bf16 = compare(before.values.bfloat16(), after.values.bfloat16(), n_resamples=20)
    assert list(bf16.index) == list(frame.index)
    nan = before.values.clone()
    nan[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"edge scores hold NaN/inf \(first at sample 1, entry"):
        compare(nan, after.values, n_resamples=20)


def test_utf8_bom_dataset(tmp_path):
    from rl_circuits.data.datasets import load_dataset

    (tmp_path / "bom").mkdir()
    row = json.dumps({"question": "What is 3+4", "answer": "#### 7"})
    (tmp_path / "bom" / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + row.encode() + b"\n")
    records = load_dataset("bom", data_dir=tmp_path)
    assert records[0].question == "What is 3+4" and records[0].gold == "7"


def test_dataset_error_names_the_config_key(tmp_path):
    from rl_circuits.data.datasets import load_dataset

    with pytest.raises(DataError) as info:
        load_dataset("nothing", data_dir=tmp_path)
    assert "set data_dir (in the config)" in str(info.value) and "--data-dir" not in str(info.value)


def test_inline_pairs_are_named_as_such_and_use_registry_templates(tmp_path):
    from rl_circuits.config import load_config

    path = tmp_path / "c.toml"
    head = 'pairs = ["p"]\ndatasets = ["d"]\n[pairs_inline.p]\nbefore = "a"\nafter = "b"\n'
    path.write_text(head + 'algorithm = "GRPO"\ntemplate = "qwen_chat"\nmax_new_tokens = 4\n')
    assert "<|im_start|>user\n{q}" in load_config(path).pairs["p"].template
    path.write_text(head + 'algorithm = "GRPO"\ntemplate = "qwen_chat"\n')
    with pytest.raises(ConfigError, match=r"\[pairs_inline\.p\]: missing max_new_tokens"):
        load_config(path)


def test_cli_environment_and_path_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RL_CIRCUITS_THREADS", "two")
    assert main(["tiny-models", str(tmp_path / "m")]) == 2
    assert "RL_CIRCUITS_THREADS='two' must be a whole number" in capsys.readouterr().err
    monkeypatch.setenv("RL_CIRCUITS_THREADS", "0")
    assert main(["tiny-models", str(tmp_path / "m")]) == 2
    assert "RL_CIRCUITS_THREADS='0'" in capsys.readouterr().err
    monkeypatch.delenv("RL_CIRCUITS_THREADS")
    (tmp_path / "file").write_text("x")
    assert main(["tiny-models", str(tmp_path / "file" / "models")]) == 2
    err = capsys.readouterr().err
    assert f"tiny-models: {tmp_path / 'file'} is a file" in err
    (tmp_path / "rundir").mkdir()
    (tmp_path / "rundir" / "config.json").write_text("{}")
    assert main(["run", str(tmp_path / "rundir")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a TOML file (a run directory? pass the TOML config" in err


def test_run_accessors_name_what_exists(tiny_run):
    from rl_circuits import load_run

    base, _ = tiny_run
    run = load_run(base / "run")
    with pytest.raises(RLCircuitsError, match="pair 'unknown' is not in run .*; it has 'tiny'"):
        run.generations("unknown", "before", "sevens")
    with pytest.raises(RLCircuitsError, match="role 'middle' is not in run"):
        run.grades("tiny", "middle", "sevens")
    with pytest.raises(RLCircuitsError, match="alpha 0.5 is not in run .*; it has 0.3, 1.0"):
        run.scores("tiny", "before", "sevens", 0.5)
    assert np.isfinite(run.scores("tiny", "before", "sevens", 1.0).values.numpy()).all()


@pytest.mark.parametrize("flag", ["parallel_attn_mlp", "attn_only"])
def test_attribute_refuses_block_layouts_it_does_not_model(model, flag, monkeypatch):
    from rl_circuits.engine.attribution import attribute

    monkeypatch.setattr(model.cfg, flag, True)
    with pytest.raises(ValueError, match=f"does not support models with {flag}=True"):
        attribute(model, *_inputs(model))


def _copy_checkpoint(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("keep_config", [False, True])
def test_checkpoint_without_tokenizer_files(tiny_checkpoints, tmp_path, capsys, keep_config):
    from rl_circuits.errors import CheckpointError
    from rl_circuits.models.checkpoints import TOKENIZER_FILES
    from rl_circuits.models.loading import load_model

    # Qwen2's tokenizer class builds itself from defaults (one token) when its files are absent
    ckpt = _copy_checkpoint(tiny_checkpoints["Qwen2ForCausalLM"], tmp_path / "notok")
    for file in ckpt.glob("tokenizer*"):
        if not (keep_config and file.name == "tokenizer_config.json"):
            file.unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, device="cpu")
    message = str(err.value)
    assert f"checkpoint directory {ckpt} has no tokenizer" in message
    assert all(name in message for name in TOKENIZER_FILES)
    assert "tokenizer.save_pretrained" in message and "config.json" in message  # what is there
    assert main(["check-model", str(ckpt)]) == 2
    assert f"error: checkpoint directory {ckpt} has no tokenizer" in capsys.readouterr().err


def test_check_model_warns_when_tokenizer_is_far_smaller_than_embedding(tmp_path, capsys):
    import transformers

    from rl_circuits.models.tiny import char_tokenizer, tiny_config

    tokenizer = char_tokenizer()
    rows = 4 * len(tokenizer)
    config = tiny_config("LlamaForCausalLM", vocab_size=rows)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "big", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "big")
    assert main(["check-model", str(tmp_path / "big")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'big'}: the tokenizer has {len(tokenizer)} tokens but the " in err
    assert f"embedding has {rows} rows (25%)" in err


def test_check_model_is_quiet_on_a_matching_tokenizer(tiny_checkpoints, capsys):
    assert main(["check-model", str(tiny_checkpoints["Qwen2ForCausalLM"])]) == 0
    assert "warning" not in capsys.readouterr().err


def test_missing_shard_is_named(tmp_path, capsys):
    import transformers

    from rl_circuits.errors import CheckpointError
    from rl_circuits.models.checkpoints import SHARD_INDEX
    from rl_circuits.models.loading import load_model
    from rl_circuits.models.tiny import char_tokenizer, tiny_config

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(tiny_config("LlamaForCausalLM", len(tokenizer)))
    ckpt = tmp_path / "sharded"
    hf.save_pretrained(ckpt, safe_serialization=True, max_shard_size="40KB")
    tokenizer.save_pretrained(ckpt)
    index = json.loads((ckpt / SHARD_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    whole = load_model(ckpt, device="cpu")  # every shard present: loads, weights as HF's
    assert torch.equal(whole.W_E, hf.model.embed_tokens.weight)
    (ckpt / shards[1]).unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, device="cpu")
    message = str(err.value)
    assert f"shard file {shards[1]} named in {SHARD_INDEX} is missing" in message
    assert f"({len(shards) - 1} of {len(shards)} shards present)" in message
    assert "weights missing" not in message
    assert main(["check-model", str(ckpt)]) == 2
    assert f"shard file {shards[1]} named in {SHARD_INDEX}" in capsys.readouterr().err
    (ckpt / SHARD_INDEX).write_text("{}")
    with pytest.raises(CheckpointError, match=f"{SHARD_INDEX} is not a valid shard index"):
        load_model(ckpt, device="cpu")


@pytest.mark.parametrize("hide", ["sys.modules", "find_spec"])
def test_zoo_build_without_trl_fails_before_training(monkeypatch, capsys, hide):
    import importlib.util
    import sys

    import rl_circuits.zoo

    if hide == "sys.modules":
        monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    else:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
        )
    started = []
    monkeypatch.setattr(rl_circuits.zoo, "main", lambda argv: started.append(argv) or 0)
    assert main(["zoo", "build", "--reduced"]) == 2
    err = capsys.readouterr().err
    assert "error: zoo build trains with trl, which is not installed" in err
    assert "pip install 'rl-circuits[zoo]'" in err
    assert started == []  # nothing was trained
    monkeypatch.undo()
    monkeypatch.setattr(rl_circuits.zoo, "main", lambda argv: started.append(argv) or 0)
    assert main(["zoo", "build", "--reduced"]) == 0  # trl installed here: the build starts
    assert started == [["--reduced"]]


def test_demo_without_trl_fails_before_training_unless_the_zoo_is_built(
    monkeypatch, capsys, tmp_path
):
    import sys

    import rl_circuits.cli.demo

    monkeypatch.setenv("RL_CIRCUITS_HOME", str(tmp_path))  # no zoo built here
    monkeypatch.setitem(sys.modules, "trl", None)
    started = []
    monkeypatch.setattr(
        rl_circuits.cli.demo, "run_demo", lambda run_dir, subset: started.append(run_dir) or 0
    )
    assert main(["demo", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error: the demo first trains its model zoo with trl, which is not installed" in err
    assert "pip install 'rl-circuits[zoo]'" in err and started == []
    monkeypatch.setattr("rl_circuits.zoo.load_zoo", lambda root, config: object())  # built
    assert main(["demo", "--run-dir", str(tmp_path / "run")]) == 0
    assert started == [str(tmp_path / "run")]
