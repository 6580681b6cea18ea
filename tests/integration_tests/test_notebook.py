"""The quickstart notebook runs top to bottom on the tiny expert pack."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch) -> None:
    home = os.environ.get("PACKLLM_TEST_HOME") or str(tmp_path / "packllm")
    monkeypatch.setenv("PACKLLM_HOME", home)
    monkeypatch.setenv("PACKLLM_NOTEBOOK_PACK", "tiny")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "best-single" in outputs and "optimal" in outputs
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the weights heatmap was not drawn"
