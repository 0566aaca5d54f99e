"""The equivalence checker's rows (every ``check.jsonl`` under the given paths) as one tidy frame."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghostsys.run.rundir import read_jsonl
from ghostsys.study.frames.runs import Paths, empty

if TYPE_CHECKING:
    import pandas as pd


def _check_dirs(paths: Paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.name == "check.jsonl" and p.is_file():
            dirs[p.parent] = None
        elif p.is_dir():
            dirs |= {f.parent: None for f in sorted(p.rglob("check.jsonl"))}
    return list(dirs)


def checks(paths: Paths) -> "pd.DataFrame":
    """Every checker row (check.jsonl) under `paths`, with `check_run`, `precision`, `world_size`, `variant`, `ratio`."""
    import json

    import pandas as pd

    frames = []
    for d in _check_dirs(paths):
        rows = read_jsonl(d / "check.jsonl")
        if not rows:
            continue
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
        df = pd.DataFrame(rows)
        world = env.get("world_size") or summary.get("world_size") or _world(df)
        df["precision"] = summary.get("precision", "?")
        df["world_size"] = world
        df["check_run"] = f"{d.name}: {summary.get('engine', df['engine'].iloc[0])}, n_g {world}, {df['precision'].iloc[0]}"
        frames.append(df)
    if not frames:
        return empty(("check_run", "section", "variant", "quantity", "max_rel", "tol", "ratio", "passed"))
    df = pd.concat(frames, ignore_index=True)
    df["variant"] = [_check_variant(r) for r in df.to_dict("records")]
    df["ratio"] = df["max_rel"] / df["tol"]
    return df


def check_summary(k: "pd.DataFrame") -> "pd.DataFrame":
    """One row per checker run: comparisons passed, the worst err/tol among them, each control's err/tol and verdict."""
    import pandas as pd

    out = []
    for run, r in k.groupby("check_run", sort=False):
        comp, ctrl = r[~r["section"].isin(["control", "facts"])], r[r["section"] == "control"]
        out.append({"check run": run, "passed": f"{int(comp['passed'].sum())}/{len(comp)}",
                    "worst err/tol": comp["ratio"].max(),
                    "control err/tol (must exceed 100)": ", ".join(
                        f"{q} {x:.2g} ({v})" for q, x, v in zip(ctrl["quantity"], ctrl["ratio"], ctrl["verdict"]))})
    return pd.DataFrame(out)


def check_facts(k: "pd.DataFrame") -> "pd.DataFrame":
    """The running-statistics statements the checker measured: verdict, statement, what was measured, tolerance."""
    import math

    import pandas as pd

    f = k[k["section"] == "facts"] if len(k) else k
    rows = [{"verdict": r["verdict"], "statement": r["quantity"], "expect": r["policy"],
             "measured": (f"{r['max_rel']:.1e}" if not math.isnan(r["max_rel"]) else
                          "integer counters differ" if "integers differ" in str(r.get("note")) else "n/a"),
             "tol": f"{r['tol']:.0e}"} for r in f.to_dict("records")]
    return pd.DataFrame(rows, columns=["verdict", "statement", "expect", "measured", "tol"])


def _world(df: "pd.DataFrame") -> int:
    m = df["factorization"].astype(str).str.extract(r"n_g (\d+)")[0].dropna()
    return int(m.astype(int).max()) if len(m) else 1


def _check_variant(r: dict[str, Any]) -> str:
    if r["section"] == "control":
        return f"NEGATIVE CONTROL: {r['factorization']}"
    f = str(r["factorization"]).split(" = ", 1)[-1]
    pol = str(r.get("policy") or "").replace("buffers engine", "").strip(", ") if r.get("policy") else ""
    return f"{r['mode']}: {f}" + (f" [{pol}]" if pol else "")
