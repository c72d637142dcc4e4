"""The notebooks are part of the product: each executes without error (on small data)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_have_no_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-profiling.ipynb",
                                           "03-scaling.ipynb"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p.name


#: what each notebook must show (``execute()`` raises on an error cell; this checks the cells
#: did their work, not merely that they ran)
EXPECTED = {
    "01-quickstart": ["chunks embedded", "json.", "[1] subprocess", "'total'"],
    "02-profiling": ["dask-rag-report.html", "'embed'", "'search'", "batched, per batch"],
    "03-scaling": ["(1, ", "(2, ", "(4, "],
}


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    parts.append(out["data"][key])
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_RAG_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = _text_outputs(nb)
    missing = [s for s in EXPECTED[path.stem] if s not in shown]
    assert not missing, f"{path.name} did not show {missing}: {shown[:2000]}"
