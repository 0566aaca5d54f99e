"""Execute the analysis notebooks (jupytext percent-format ``analysis/*.py``) with papermill.

A notebook's ``parameters``-tagged cell names its results folder(s) and where its figures go; papermill
injects the values given here after it (its convention), runs every cell in a fresh kernel, and writes
the executed notebook, outputs included, as ``.ipynb``. Nothing here changes the notebooks on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "analysis"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def notebooks(folder: str | Path = NOTEBOOK_DIR) -> dict[str, Path]:
    """Every notebook of `folder` by name (file stem): its ``*.py`` files in jupytext percent format."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.py")) if p.read_text().lstrip().startswith(("# %%", "# ---"))}


def execute(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any], *,
            cwd: str | Path = NOTEBOOK_DIR, timeout: int = 600) -> Path:
    """Run `notebook` (a jupytext .py) with `parameters` in a fresh python3 kernel; write the executed .ipynb to `output`.

    The kernel starts in `cwd` (default: the notebooks' folder, as Jupyter would) and inherits this process's
    environment; this process's own working directory is never changed (so several may run at once).
    Raises papermill's PapermillExecutionError (naming the failing cell) when a cell fails; the partly
    executed notebook is still written, so its outputs show where.
    """
    import jupytext
    import papermill

    nb = jupytext.read(notebook)
    nb.metadata["kernelspec"] = dict(KERNEL)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # nbclient starts the kernel in resources' path; papermill's own cwd= would chdir this whole process.
    papermill.execute_notebook(nb, str(output), parameters=dict(parameters), kernel_name=KERNEL["name"],
                               language="python", progress_bar=False, execution_timeout=timeout,
                               resources={"metadata": {"path": str(cwd)}})
    return output


def execute_many(jobs: Mapping[str, tuple[str | Path, str | Path, Mapping[str, Any]]], workers: int = 2,
                 cwd: str | Path = NOTEBOOK_DIR) -> dict[str, BaseException | None]:
    """Execute several notebooks, `workers` kernels at a time: {name: (notebook, output, parameters)} ->
    {name: None, or the error it raised}. Each kernel is its own process; most of a short notebook's time
    is its kernel starting and importing pandas and seaborn, which a second core does in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[str | Path, str | Path, Mapping[str, Any]]) -> BaseException | None:
        try:
            execute(*job, cwd=cwd)
        except Exception as err:  # reported per notebook; the others still run
            return err
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip(jobs, pool.map(one, jobs.values())))
