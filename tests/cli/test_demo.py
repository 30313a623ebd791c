"""The demo: its config validates against the zoo's pairs; it prints the zoo's accuracies."""

import pytest

from rl_circuits.config import load_config
from rl_circuits.resources import resource_dir


def _register_toy_pairs(home):
    """The zoo's two pairs in a registry under `home` (RL_CIRCUITS_HOME)."""
    (home / "pairs").mkdir()
    (home / "pairs" / "toy.toml").write_text(
        "".join(
            f'[pairs.{name}]\nbefore = "{home}/sft"\nafter = "{home}/{algo.lower()}"\n'
            f'algorithm = "{algo}"\ntemplate = "{{q}}\\n"\nmax_new_tokens = 96\n\n'
            for name, algo in (("toy-grpo", "GRPO"), ("toy-dpo", "DPO"))
        )
    )


def _zoo(root, correct):
    """A built zoo's handle under `root` whose models answer the questions as `correct` says
    (recipe -> per-question correctness); no checkpoints behind it."""
    from rl_circuits.zoo import Zoo, ZooConfig
    from rl_circuits.zoo.paired import mcnemar_exact

    return Zoo(
        root=root,
        config=ZooConfig(),
        data_dir=root / "data",
        sft=root / "sft",
        grpo=root / "grpo",
        dpo=root / "dpo",
        accuracy={recipe: sum(c) / len(c) for recipe, c in correct.items()},
        paired={r: mcnemar_exact(correct["sft"], correct[r]) for r in ("grpo", "dpo")},
    )


def test_demo_config_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_CIRCUITS_HOME", str(tmp_path))
    _register_toy_pairs(tmp_path)
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

    sft = [True] * 120 + [False] * 180
    grpo = [True] * 110 + [False] * 10 + [True] * 40 + [False] * 140
    dpo = [True] * 115 + [False] * 5 + [True] * 30 + [False] * 150
    zoo = _zoo(tmp_path, {"sft": sft, "grpo": grpo, "dpo": dpo})
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


def test_demo_on_another_subset_writes_its_own_config_and_run(tmp_path, monkeypatch):
    """`demo --subset only_after` runs the same study on the questions post-training fixed,
    in a config and run directory of its own; an unknown subset is refused before the zoo."""
    import rl_circuits.pipeline.run
    import rl_circuits.zoo
    from rl_circuits.cli.demo import run_demo
    from rl_circuits.errors import ConfigError

    monkeypatch.setenv("RL_CIRCUITS_HOME", str(tmp_path))
    _register_toy_pairs(tmp_path)
    zoo = _zoo(tmp_path, dict.fromkeys(("sft", "grpo", "dpo"), [True, False]))
    built = []
    monkeypatch.setattr(rl_circuits.zoo, "build_zoo", lambda progress=True: built.append(1) or zoo)
    runs = []

    class Stop(Exception):
        """Raised where the study would start."""

    def stop(config, **kwargs):
        runs.append((config, kwargs["run_dir"]))
        raise Stop

    monkeypatch.setattr(rl_circuits.pipeline.run, "run_pipeline", stop)
    for subset in ("both_correct", "only_after"):
        with pytest.raises(Stop):
            run_demo(subset=subset)
    assert runs == [
        (tmp_path / "demo.toml", "runs/demo"),
        (tmp_path / "demo-only_after.toml", "runs/demo-only_after"),
    ]
    paper, fixed = (load_config(config) for config, _ in runs)
    assert paper.select.subset == "both_correct" and fixed.select.subset == "only_after"
    assert fixed.run.data_dir == str(tmp_path / "data")
    assert fixed.select.n == paper.select.n and fixed.diff.enabled
    with pytest.raises(ConfigError, match="demo --subset must be one of both_correct, "):
        run_demo(subset="fixed")
    assert len(built) == 2  # refused before the zoo is built
