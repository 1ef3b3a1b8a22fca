"""Every tutorial notebook executes without error, and its outputs carry no warnings or local paths.

The notebooks run with nbclient on the ``python3`` kernel with ``tutorials/`` as the working
directory, as myst-nb runs them for the docs. The stored outputs are left alone: the executed
copy is checked in memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: A Python warning as ``warnings`` prints it ("...: UserWarning: ..."), or an absolute path of a
#: developer's machine.
FORBIDDEN = {
    "a Python warning": re.compile(r"Warning:"),
    "an absolute developer path": re.compile(r"/work/"),
}


def output_texts(notebook) -> list[tuple[int, str]]:
    """``(cell index, text)`` of every stream, error and plain-text or HTML output."""
    texts = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append((index, output["text"]))
            elif output["output_type"] == "error":
                texts.append((index, "\n".join(output["traceback"])))
            else:
                data = output.get("data", {})
                texts += [(index, data[kind]) for kind in ("text/plain", "text/html") if kind in data]
    return texts


def test_there_are_tutorials():
    assert {"probe.ipynb", "scopevi.ipynb"} <= {path.name for path in NOTEBOOKS}


def test_forbidden_patterns_match_what_they_should():
    texts = {
        "/tmp/x.py:3: UserWarning: zero-filled": "a Python warning",
        "tqdm/auto.py:21: TqdmWarning: IProgress not found": "a Python warning",
        "loaded /work/shared/data/x.h5ad": "an absolute developer path",
    }
    for text, kind in texts.items():
        assert FORBIDDEN[kind].search(text)
    assert not any(p.search("Seed set to 0\nTraining: 100%") for p in FORBIDDEN.values())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_tutorial_executes_cleanly(path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    problems = [
        f"cell {index} shows {kind}: {match.group(0)!r} in {text[max(0, match.start() - 80):match.end() + 80]!r}"
        for index, text in output_texts(notebook)
        for kind, pattern in FORBIDDEN.items()
        if (match := pattern.search(text))
    ]
    assert not problems, "\n".join(problems)
