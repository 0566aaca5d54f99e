"""What every figure shares: the missing-data message, saving (PNG + the rows as CSV), style, a bare Figure."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DPI = 110
ZERO_FLOOR = 1e-9  # an exact zero drawn on a log axis


def have(df: "pd.DataFrame", what: str) -> bool:
    """True when `df` has rows; otherwise print that `what` is missing and return False (the caller skips it)."""
    if df is not None and len(df):
        return True
    print(f"no {what}: skipped (`make analysis` produces every kind of result)")
    return False


def save(fig: "Figure", path: str | Path | None, data: "pd.DataFrame | None" = None) -> "Figure":
    """Write fig as PNG to `path` (and `data`, the rows it shows, as CSV beside it); return fig."""
    if path is not None:
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
        if data is not None:
            data.to_csv(path.with_suffix(".csv"), index=False)
    return fig


@contextmanager
def style(axes: str = "whitegrid") -> Iterator[None]:
    """Seaborn's look for the axes made inside, without touching matplotlib's global rcParams."""
    import seaborn as sns

    with sns.axes_style(axes), sns.plotting_context("notebook", font_scale=0.85):
        yield


def figure(width: float, height: float, **kw: Any) -> tuple["Figure", Any]:
    """A bare Figure (no pyplot: no backend, no global figure registry) and its subplots(**kw)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(**kw)


def gm_hue(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    """df with a "ghost groups" label column (G_M=4, ...) and those labels in numeric order, for hue=."""
    order = [f"G_M={g}" for g in sorted(df["G_M"].unique())]
    return df.assign(**{"ghost groups": [f"G_M={g}" for g in df["G_M"]]}), order
