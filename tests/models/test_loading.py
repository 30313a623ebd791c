"""Loading through model_maps: logit parity with Hugging Face, and clear refusals."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_circuits.errors import CheckpointError
from rl_circuits.models.checkpoints import load_tokenizer
from rl_circuits.models.loading import load_model, model_maps

PROMPT = "Natalia sold 48 clips in April, and half as many in May. How many? 48+24=72."


# float64: both libraries build the rotary tables in float32 (measured max diff 3.4e-8).
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_logits_match_hugging_face(tiny_checkpoint, dtype, tol):
    model = load_model(tiny_checkpoint, dtype=dtype, device="cpu", max_seq_len=128)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    tokens = load_tokenizer(tiny_checkpoint)(PROMPT, return_tensors="pt").input_ids
    assert tokens.shape[1] > 6  # longer than the Mistral fixture's sliding window
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= tol


@pytest.mark.parametrize(
    "name,dtype", [("float64", torch.float64), ("torch.float32", torch.float32)]
)
def test_dtype_by_name_as_configs_write_it(tiny_checkpoints, name, dtype):
    model = load_model(
        tiny_checkpoints["LlamaForCausalLM"], dtype=name, device="cpu", max_seq_len=64
    )
    assert model.cfg.dtype == dtype and model.W_U.dtype == dtype


def test_config_follows_checkpoint(tiny_checkpoints):
    qwen = load_model(tiny_checkpoints["Qwen2ForCausalLM"], device="cpu", max_seq_len=64)
    assert qwen.cfg.n_key_value_heads == 2 and qwen.cfg.n_heads == 4
    assert qwen.cfg.rotary_base == 1_000_000.0
    assert qwen.blocks[0].attn.b_Q.abs().sum() > 0  # qkv bias loaded
    mistral = load_model(tiny_checkpoints["MistralForCausalLM"], device="cpu", max_seq_len=64)
    assert mistral.cfg.window_size == 6 and mistral.cfg.attn_types == ["local", "local"]
    assert not torch.equal(mistral.W_U, mistral.W_E.T)  # untied unembedding


def test_n_ctx_is_capped_by_checkpoint_limit(tiny_checkpoints):
    model = load_model(tiny_checkpoints["LlamaForCausalLM"], device="cpu", max_seq_len=100_000)
    assert model.cfg.n_ctx == 256  # the fixture's max_position_embeddings
    assert load_model(tiny_checkpoints["LlamaForCausalLM"], device="cpu").cfg.n_ctx == 256


def test_architecture_comes_from_config_not_name(tiny_checkpoints, tmp_path):
    renamed = tmp_path / "mistral-7b-sft"  # a Mistral-sounding name holding a Llama checkpoint
    shutil.copytree(tiny_checkpoints["LlamaForCausalLM"], renamed)
    assert load_model(renamed, device="cpu").cfg.original_architecture == "LlamaForCausalLM"


def test_unknown_architecture_lists_supported(tiny_checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["LlamaForCausalLM"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(bad, device="cpu")
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in model_maps():
        assert arch in message


def test_pickle_only_checkpoint_is_refused(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["LlamaForCausalLM"]
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    from safetensors.torch import load_file

    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(pickled, device="cpu")
    model = load_model(pickled, device="cpu", allow_pickle=True)
    reference = load_model(src, device="cpu")
    assert torch.equal(model.W_E, reference.W_E)


def test_processing_options_keep_logits(tiny_checkpoints):
    path = tiny_checkpoints["Qwen2ForCausalLM"]
    raw = load_model(path, device="cpu", dtype=torch.float64)
    folded = load_model(path, device="cpu", dtype=torch.float64, fold_ln=True, center_unembed=True)
    tokens = torch.arange(4, 30).unsqueeze(0)
    with torch.no_grad():
        a, b = raw(tokens).log_softmax(-1), folded(tokens).log_softmax(-1)
    assert (a - b).abs().max() < 1e-6  # measured 1.8e-8: TransformerLens folds in float32


def test_check_model_command(tiny_checkpoints, capsys):
    from rl_circuits.cli.main import main

    assert main(["check-model", str(tiny_checkpoints["MistralForCausalLM"])]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("tokens): ")[1].split(",")[0])
    assert diff < 1e-4
    assert "graph 'paper': 5 upstream x 9 downstream nodes, 23 edges" in out
    assert out.splitlines()[-1].startswith("PASS: logit difference ")
    assert out.splitlines()[-1].endswith("<= the float32 tolerance 0.0001")


def test_check_model_judges_each_dtype_by_its_own_tolerance(tiny_checkpoints, capsys):
    """bfloat16 logits differ from Hugging Face's float32 ones by bfloat16 rounding (about 1e-2
    of the largest logit here), far above float32's bound and well within bfloat16's; a failing
    check says FAIL, naming the tolerance it failed."""
    from rl_circuits.cli.main import main

    path = str(tiny_checkpoints["Qwen2ForCausalLM"])
    assert main(["check-model", path, "--dtype", "bfloat16"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("PASS: ") and last.endswith("<= the bfloat16 tolerance 0.25")
    relative = float(last.split("logit difference ")[1].split()[0])
    assert 1e-4 < relative < 0.25  # bfloat16 rounding: fails a float32 bound, passes its own
    assert main(["check-model", path, "--dtype", "bfloat16", "--tolerance", "1e-4"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"FAIL: logit difference {relative:.2e} of the largest |logit| > ")
    assert "the given tolerance 0.0001" in last and "model_maps/" in last
