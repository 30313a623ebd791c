"""The notebooks run top to bottom against a run made by the tiny pipeline."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_explore_edges.ipynb"]
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


def _outputs(path: Path, run_dir: Path, monkeypatch, then: tuple[str, ...] = ()) -> str:
    """The text and data of every output of notebook `path` run against `run_dir`, with the
    code cells `then` run after its own."""
    monkeypatch.setenv("RL_CIRCUITS_RUN", str(run_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    book.cells += [nbformat.v4.new_code_cell(source) for source in then]
    NotebookClient(book, timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()
    return "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}))
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def check_exact_loss_change(text: str, run_dir: Path) -> None:
    """Notebook 02's last printed exact loss change of an edge is the one `attribute`'s exact
    method computes for that edge (never a number the notebook did not compute)."""
    import torch

    import rl_circuits

    lines = re.findall(r"edge (\S+) -> (\S+): \S+ score \S+, exact loss change (\S+)", text)
    assert lines, text[-2000:]
    up, down, printed = lines[-1][0], lines[-1][1], float(lines[-1][2])
    run = rl_circuits.load_run(run_dir)
    pair, dataset = next(iter(run.config.pairs)), run.config.run.datasets[0]
    after = run.scores(pair, "after", dataset, max(run.config.alphas))
    gen = {g["id"]: g for g in run.generations(pair, "after", dataset)}[after.ids[0]]
    t_cut = after.meta["t_cut"]
    tokens = torch.tensor([gen["prompt_ids"] + gen["answer_ids"][:t_cut]])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, -t_cut:] = True
    model = rl_circuits.load_model(run.model_path(pair, "after"), device="cpu")
    exact = rl_circuits.attribute(model, tokens, mask, graph=after.graph, method="exact")
    value = exact.values[0, exact.index(up), exact.index(down)].item()
    assert value != 0
    assert printed == pytest.approx(value, rel=2e-3, abs=1e-7)  # printed to 4 digits


@pytest.fixture(scope="module")
def block_run(tiny_run, tmp_path_factory):
    """The tiny pipeline rerun with attribute.graph = "block" (attention input node
    `hook_attn_in`, which no TransformerLens hook point holds)."""
    from config_support import write_config

    from rl_circuits.cli.main import main

    base, config = tiny_run
    out = tmp_path_factory.mktemp("block-run")
    overrides = {"run": {"run_dir": str(out / "run")}, "attribute": {"graph": "block"}}
    assert main(["run", str(write_config(out / "block.toml", overrides, base=config))]) == 0
    return out / "run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tiny_run, monkeypatch):
    base, _ = tiny_run
    text = _outputs(path, base / "run", monkeypatch)
    assert "Traceback" not in text
    if path.name.startswith("01"):
        assert "Act. Intens." in text and "heatmap" in text
    else:
        check_exact_loss_change(text, base / "run")
    assert os.environ["RL_CIRCUITS_RUN"] == str(base / "run")


def test_explore_edges_computes_the_exact_change_on_the_block_graph(block_run, monkeypatch):
    """The block graph's edges into `hook_attn_in`: the loss change printed is the computed
    one, not the 0 of a hook that never fires (issue 22). The notebook's last cell runs again
    on the strongest such edge, and so does the edge patched by hand in TransformerLens (the
    cell asserts that both changes agree: `hooks_enabled` makes `hook_attn_in` fire)."""
    code = [c.source for c in nbformat.read(NOTEBOOKS[1], as_version=4).cells[-3:]]
    exact, by_hand = code[0], code[2]
    assert "evaluate_circuit(" in exact and "hooks_enabled(" in by_hand
    pick = 'top = top[top["downstream"].str.endswith("hook_attn_in")]'
    text = _outputs(NOTEBOOKS[1], block_run, monkeypatch, then=(pick, exact, by_hand))
    assert "Traceback" not in text
    assert re.findall(r"edge \S+ -> (\S+):", text)[-1].endswith("hook_attn_in")
    check_exact_loss_change(text, block_run)
    assert len(re.findall(r"by hand in TransformerLens: loss change", text)) == 2
