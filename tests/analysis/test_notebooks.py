"""The notebooks run top to bottom against a run made by the tiny pipeline."""

import json
import os
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tiny_run, monkeypatch):
    base, _ = tiny_run
    monkeypatch.setenv("RL_CIRCUITS_RUN", str(base / "run"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()
    text = "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}))
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "Traceback" not in text
    if path.name.startswith("01"):
        assert "Act. Intens." in text and "heatmap" in text
    else:
        assert "exact loss change" in text
    assert os.environ["RL_CIRCUITS_RUN"] == str(base / "run")
