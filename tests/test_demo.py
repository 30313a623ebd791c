"""The demo's config validates against the pairs the zoo registers."""

from rl_circuits.config import load_config
from rl_circuits.paths import resource_dir


def test_demo_config_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_CIRCUITS_HOME", str(tmp_path))
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "toy.toml").write_text(
        "".join(
            f'[pairs.{name}]\nbefore = "{tmp_path}/sft"\nafter = "{tmp_path}/{algo.lower()}"\n'
            f'algorithm = "{algo}"\ntemplate = "{{q}}\\n"\nmax_new_tokens = 96\n\n'
            for name, algo in (("toy-grpo", "GRPO"), ("toy-dpo", "DPO"))
        )
    )
    cfg = load_config(resource_dir("configs") / "demo.toml")
    assert list(cfg.pairs) == ["toy-grpo", "toy-dpo"]
    assert cfg.alphas == [0.1, 0.3, 0.5, 1.0]
    assert cfg["attribute"]["graph"] == "paper"
    assert cfg.pairs["toy-dpo"].algorithm == "DPO"
