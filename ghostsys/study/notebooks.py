"""Execute the analysis notebooks (jupytext percent-format ``analysis/*.py``) with papermill.

A notebook's ``parameters``-tagged cell names its results folder(s) and where its figures go; papermill
injects the values given here after it (its convention), runs every cell in a fresh kernel, and writes
the executed notebook, outputs included, as ``.ipynb``. Nothing here changes the notebooks on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "analysis"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebooks(folder: str | Path = NOTEBOOK_DIR) -> dict[str, Path]:
    """Every notebook of `folder` by name (file stem): its ``*.py`` files in jupytext percent format."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.py")) if p.read_text().lstrip().startswith(("# %%", "# ---"))}


def execute(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any], *, cwd: str | Path = ROOT,
            timeout: int = 600) -> Path:
    """Run `notebook` (a jupytext .py) with `parameters` in a fresh python3 kernel; write the executed .ipynb to `output`.

    Raises papermill's PapermillExecutionError (naming the failing cell) when a cell fails; the partly
    executed notebook is still written, so its outputs show where.
    """
    import jupytext
    import papermill

    nb = jupytext.read(notebook)
    nb.metadata["kernelspec"] = dict(KERNEL)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The kernel is a child process: keep it headless and from fighting the sweep for the 2 cores.
    env = {"MPLBACKEND": os.environ.get("MPLBACKEND", "Agg"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(nb, str(output), parameters=dict(parameters), kernel_name=KERNEL["name"],
                                   language="python", cwd=str(cwd), progress_bar=False, execution_timeout=timeout)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return output
