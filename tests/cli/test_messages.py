"""Messages and defaults a new user meets first: fast answers with nothing to compute, help
text for every command and option (issue 22, part 5)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rl_circuits.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[2]
HEAVY_PROBE = (
    "import sys\n"
    "from rl_circuits.cli.main import main\n"
    "status = main(sys.argv[1:])\n"
    "print(status, sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))\n"
)


def _probe(argv: list[str], cwd: Path) -> str:
    """The last line HEAVY_PROBE prints for `rl-circuits ARGV` in a fresh process: the exit
    status and which of torch and TransformerLens it imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", HEAVY_PROBE, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip(), done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_validation_and_a_finished_run_import_neither_torch_nor_transformer_lens(
    tiny_run, tmp_path
):
    """The seconds torch and TransformerLens take to import are not spent on a config typo or
    on a run with nothing left to do (bench/cli_startup.py times both)."""
    _base, config = tiny_run
    typo = tmp_path / "typo.toml"
    typo.write_text(config.read_text().replace("[select]\n", "[select]\ncolour = 1\n"))
    assert _probe(["run", str(typo)], tmp_path) == "2 []"
    # every stage done; run from the directory the run was made in, which the manifest records
    assert _probe(["run", str(config)], Path.cwd()) == "0 []"
    code = (
        "import sys\nfrom rl_circuits.config import load_config\n"
        "for name in ('tiny', 'paper'):\n    load_config(f'configs/{name}.toml')\n"
        "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_threads_setting_reaches_torch_when_it_is_imported_later(tmp_path):
    code = (
        "import os, sys\nfrom rl_circuits.cli.main import _threads\n"
        "os.environ['RL_CIRCUITS_THREADS'] = '1'\n_threads()\n"
        "import torch\nprint(torch.get_num_threads())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "1", done.stderr


def _commands() -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return dict(sub.choices)


def test_every_command_says_what_it_does_and_every_option_has_help():
    from rl_circuits.pipeline.registry import STAGE_NAMES

    commands = _commands()
    assert {"run", *STAGE_NAMES} <= set(commands)
    for name, command in commands.items():
        assert command.description and len(command.description) > 20, name
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest}: no help"
    force = next(a for a in commands["run"]._actions if a.dest == "force")
    assert "delete the outputs it makes stale" in force.help


def test_stage_help_names_the_stage_work(capsys):
    with pytest.raises(SystemExit) as info:
        main(["grade", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as wrapped to any terminal width
    assert "Grade every answer against the gold answer." in out
    assert "delete the outputs it makes stale" in out


def test_zoo_without_an_action_names_the_action(capsys):
    assert main(["zoo"]) == 2
    err = capsys.readouterr().err
    assert "error: zoo: name an action: `rl-circuits zoo build`" in err
    assert "args" not in err


def _pair_config(tmp_path: Path, pair: dict, name: str = "p") -> Path:
    """A config that runs the inline pair `name` with the fields `pair` (defaults for the rest)."""
    import tomli_w

    fields = {"algorithm": "GRPO", "template": "Q: {q}\nA:", "max_new_tokens": 4, **pair}
    doc = {"pairs": [name], "datasets": ["d"], "pairs_inline": {name: fields}}
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def test_a_template_field_other_than_q_is_refused(tmp_path):
    from rl_circuits.config import load_config
    from rl_circuits.errors import ConfigError

    path = _pair_config(tmp_path, {"before": "a", "after": "b", "template": "{x} Q: {q}"})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: [pairs_inline.p]: template field {{x}} would stay in every prompt as text: {{q}} "
        "(the question) is the only field a template fills; write the text itself"
    )
    # braces that are no field, such as LaTeX's \boxed{}, are text
    path = _pair_config(tmp_path, {"before": "a", "after": "b", "template": "{q} \\boxed{}"})
    assert load_config(path).pairs["p"].prompt("1+1") == "1+1 \\boxed{}"


def test_an_inline_pair_named_like_a_registered_one_is_warned(tmp_path, capsys):
    from rl_circuits.config import config_from_resolved, load_config
    from rl_circuits.errors import RLCircuitsWarning
    from rl_circuits.models.pairs import load_pairs

    registered = load_pairs()["mistral"]
    mine = {"before": "mine", "after": registered.after, "algorithm": registered.algorithm}
    path = _pair_config(tmp_path, mine, "mistral")
    with pytest.warns(RLCircuitsWarning) as record:
        cfg = load_config(path)
    assert cfg.pairs["mistral"].before == "mine"  # the inline pair is used, not silently
    assert len(record) == 1 and str(record[0].message) == (
        f"{path}: [pairs_inline.mistral] replaces the registered pair 'mistral' (it differs in "
        "before, template, max_new_tokens, family, stop); name it otherwise to keep both apart"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run's stored config lists every pair inline
        config_from_resolved(cfg.resolved(), "config.json")
        same = {k: v for k, v in vars(registered).items() if k != "name" and v is not None}
        (tmp_path / "same").mkdir()
        same["stop"] = list(registered.stop)
        load_config(_pair_config(tmp_path / "same", same, "mistral"))  # identical: no warning
    assert main(["select", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("replaces the registered pair") == 1


@pytest.mark.parametrize("after", ["same", "same/", "./same"])
def test_the_same_checkpoint_before_and_after_is_warned_and_generated_once(tmp_path, capsys, after):
    from rl_circuits.config import load_config
    from rl_circuits.errors import RLCircuitsWarning
    from rl_circuits.models.pairs import pair_models

    path = _pair_config(tmp_path, {"before": "same", "after": after})
    with pytest.warns(RLCircuitsWarning, match="'p': before and after are the same checkpoint"):
        cfg = load_config(path)
    assert len(list(pair_models(cfg.pairs.values()))) == 1  # one model to generate and grade
    assert main(["select", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "warning: pair 'p': before and after are the same checkpoint (same); its answers are "
        "generated and graded once, and every comparison is of the model with itself. Set "
        "after to the post-trained checkpoint."
    )
    assert err[1].startswith("error: the select stage needs")


def test_readme_top_edges_example_runs_on_a_graph_with_fewer_cells(tiny_checkpoints):
    """The README's circuit example, run as written on a model whose paper graph has fewer
    than 100 cells: it keeps every edge, so its loss is the whole graph's."""
    import torch

    import rl_circuits

    text = (REPO / "README.md").read_text()
    start = text.index("# The loss with only the top 100 edges")
    end = text.index("\n", text.index("loss = rl_circuits.evaluate_circuit(", start))
    model = rl_circuits.load_model(tiny_checkpoints["Qwen2ForCausalLM"], device="cpu")
    tokens = torch.arange(1, 9).reshape(2, 4)
    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    loss_mask[:, 0] = False  # the first token is predicted by no position
    scores = rl_circuits.attribute(model, tokens, loss_mask)
    assert scores.edge_mask.numel() < 100
    namespace = {"torch": torch, "rl_circuits": rl_circuits, "model": model, "tokens": tokens}
    namespace |= {"loss_mask": loss_mask, "scores": scores}
    exec(text[start:end], namespace)
    whole = rl_circuits.evaluate_circuit(model, tokens, loss_mask, scores.edge_mask)
    assert torch.equal(namespace["loss"], whole)
