"""The demo: its config validates against the zoo's pairs; it prints the zoo's accuracies."""

import pytest

from rl_circuits.config import load_config
from rl_circuits.resources import resource_dir


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
    assert cfg.attribute.graph == "paper"
    assert cfg.pairs["toy-dpo"].algorithm == "DPO"
    assert cfg.diff.enabled and cfg.diff.alphas == (1.0,)  # both pairs, both directions


def test_demo_prints_the_accuracies_and_paired_tests(tmp_path, monkeypatch, capsys):
    """`rl-circuits demo` prints the zoo's three accuracies and both paired tests first."""
    import rl_circuits.pipeline.run
    import rl_circuits.zoo
    from rl_circuits.cli.demo import run_demo
    from rl_circuits.zoo import Zoo, ZooConfig
    from rl_circuits.zoo.paired import mcnemar_exact

    sft = [True] * 120 + [False] * 180
    grpo = [True] * 110 + [False] * 10 + [True] * 40 + [False] * 140
    dpo = [True] * 115 + [False] * 5 + [True] * 30 + [False] * 150
    zoo = Zoo(
        root=tmp_path,
        config=ZooConfig(),
        data_dir=tmp_path / "data",
        sft=tmp_path / "sft",
        grpo=tmp_path / "grpo",
        dpo=tmp_path / "dpo",
        accuracy={"sft": 120 / 300, "grpo": 150 / 300, "dpo": 145 / 300},
        paired={"grpo": mcnemar_exact(sft, grpo), "dpo": mcnemar_exact(sft, dpo)},
    )
    monkeypatch.setattr(rl_circuits.zoo, "build_zoo", lambda progress=True: zoo)

    class Stop(Exception):
        """Raised where the study would start."""

    def stop(config, **kwargs):
        assert kwargs["run_dir"] == str(tmp_path / "run") and config == tmp_path / "demo.toml"
        raise Stop

    monkeypatch.setattr(rl_circuits.pipeline.run, "run_pipeline", stop)
    with pytest.raises(Stop):
        run_demo(str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "greedy test accuracy (300 questions): SFT 40.0%, GRPO 50.0%, DPO 48.3%" in out
    assert (
        "GRPO vs SFT: +10.0 points (40.0% -> 50.0%; 40 gained, 10 lost, McNemar exact p = " in out
    )
    assert "DPO vs SFT: +8.3 points (40.0% -> 48.3%; 30 gained, 5 lost, McNemar exact p = " in out
    assert "README check: this run DIFFERS from the README's numbers (SFT 40.0% vs " in out
