"""Mean ± std over runs, grouped by their settings, with the groups side by side.

Usage::

    python -m moleflow.summarize logs/run_a logs/run_b ... [--out PATH]

Each folder is an experiment folder of ``run_moleflow.py``: ``config.json``, ``final_results.csv`` (one
row per class, last row ``mean``), ``continual_summary.csv`` (final mean, forgetting FM and backward
transfer BWT per metric) and, when evaluated, ``final_results_oracle.csv`` (the true task given).

Runs are grouped by the resolved fields of ``config.json`` (``amp``, ``tf32`` and ``compile_flow`` as
they acted, and the task list) except ``BOOKKEEPING`` (seed, names, folders, device, ...): the seeds of
one configuration are averaged, runs differing in anything else never are. A field missing from an
older run counts as ``unknown``. A group is named by its ``ablation_preset`` plus the settings that
tell it from other groups of that preset.

The std is the sample std (ddof = 1; NaN for one run); a NaN in any run makes that cell's mean NaN
(nothing is skipped). Files written (default: the runs' common parent folder, ``summary_<timestamp>*``;
``--out`` a ``.csv`` path or a folder):

- ``summary_<ts>.csv``: per group, evaluation (``routed``/``oracle``) and class (and the ``mean``
  row): ``n_runs`` and ``<metric>_mean``, ``<metric>_std``;
- ``summary_<ts>_continual.csv``: per group and metric: final mean, forgetting and BWT, mean and std;
- ``summary_<ts>_groups.csv`` and ``.md``: one row per group side by side (routed means, oracle
  means, forgetting, BWT), its runs, seeds and distinguishing settings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from moleflow.run_groups import (
    CONTINUAL_COLUMNS, METRIC_COLUMNS, SHORT, GroupSummary, SummaryError, check_distinct, differing_settings,
    group_runs, load_run, side_by_side, summarize_group,
)


def pm(mean: float, std: float, scale: float = 100.0) -> str:
    """``mean ± std`` in percent; ``n/a`` when not measured; the mean alone for one run."""
    if math.isnan(mean):
        return "n/a"
    return f"{scale * mean:.2f}" if math.isnan(std) else f"{scale * mean:.2f} ± {scale * std:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), *(line(r) for r in rows)]


def format_classes(table: pd.DataFrame, markdown: bool = False) -> list[str]:
    """Per class (and the mean row): ``mean ± std`` of every metric, in percent."""
    header = ["class", *(SHORT[m] for m in METRIC_COLUMNS)]
    rows = [[str(r["class_name"]), *(pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRIC_COLUMNS)]
            for _, r in table.iterrows()]
    return _table(header, rows, markdown)


def format_continual(table: pd.DataFrame, markdown: bool = False) -> list[str]:
    """Per metric: final mean, forgetting FM and BWT, ``mean ± std`` in percent points."""
    header = ["metric", "final mean", "forgetting FM", "BWT"]
    rows = [[SHORT.get(r["metric"], r["metric"]), *(pm(r[f"{c}_mean"], r[f"{c}_std"]) for c in CONTINUAL_COLUMNS)]
            for _, r in table.iterrows()]
    return _table(header, rows, markdown)


def format_side_by_side(table: pd.DataFrame, markdown: bool = False) -> list[str]:
    """The groups side by side, four blocks: routed means, oracle means, forgetting, BWT."""
    blocks = [("final mean over classes, routed", "", METRIC_COLUMNS, "n_runs"),
              ("final mean over classes, oracle (true task given)", "oracle_", METRIC_COLUMNS[1:], "n_oracle"),
              ("forgetting FM (lower is better)", "forgetting_", METRIC_COLUMNS, "n_runs"),
              ("backward transfer BWT (negative = forgotten)", "bwt_", METRIC_COLUMNS, "n_runs")]
    out: list[str] = []
    for title, prefix, metrics, n_column in blocks:
        header = ["group", "n", *(SHORT[m] for m in metrics)]
        rows = [[str(r["group"]), str(int(r[n_column])),
                 *(pm(r[f"{prefix}{m}_mean"], r[f"{prefix}{m}_std"]) for m in metrics)] for _, r in table.iterrows()]
        out += ["", f"{'### ' if markdown else ''}{title} (%, mean ± sample std over n runs)", "",
                *_table(header, rows, markdown)]
    return out


def format_report(summaries: Sequence[GroupSummary], differing: dict[str, dict[str, list[str]]],
                  overview: pd.DataFrame) -> str:
    """Everything printed: per group its runs, class tables and continual table; the differing
    settings; the groups side by side."""
    lines: list[str] = []
    for s in summaries:
        g = s.group
        seeds = [r.seed for r in g.runs]
        lines += ["", f"== {g.name}: {len(g.runs)} run(s), seeds {' '.join(seeds)}",
                  *(f"   {r.folder}" for r in g.runs), "", "final results, routed (%):", *format_classes(s.routed)]
        if s.oracle is not None:
            lines += ["", f"final results, oracle: true task given ({int(s.oracle['n_runs'].iloc[0])} run(s), %):",
                      *format_classes(s.oracle)]
        lines += ["", "continual (%, percent points):", *format_continual(s.continual)]
        if len(set(seeds)) < len(seeds):
            lines.append(f"warning: group {g.name} averages runs with the same seed ({' '.join(seeds)})")
    lines += ["", "settings that differ between groups:" if differing else
              f"all {sum(len(s.group.runs) for s in summaries)} run(s) have the same settings"]
    for key, values in differing.items():
        lines.append(f"  {key}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in values.items()))
    lines += format_side_by_side(overview)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ output

def output_paths(folders: Sequence[str], out: Optional[str]) -> dict[str, Path]:
    """Where the files go: ``--out`` (a ``.csv`` path, or a folder) or the runs' common parent folder,
    named ``summary_<timestamp>`` (a suffix keeps an earlier summary of the same second)."""
    if out is not None and not (out.endswith(os.sep) or os.path.isdir(out)):
        base = Path(out[:-4] if out.endswith(".csv") else out)
    else:
        parent = Path(out) if out is not None else Path(os.path.commonpath(
            [os.path.dirname(os.path.realpath(f)) for f in folders]))
        stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
        base, suffix = parent / f"summary_{stamp}", 1
        while base.with_name(base.name + ".csv").exists():
            base, suffix = parent / f"summary_{stamp}_{suffix}", suffix + 1
    ends = {"classes": ".csv", "continual": "_continual.csv", "groups": "_groups.csv", "markdown": "_groups.md"}
    return {key: base.with_name(base.name + end) for key, end in ends.items()}


def _columns_first(table: pd.DataFrame, first: Sequence[str]) -> pd.DataFrame:
    return table[[*first, *(c for c in table.columns if c not in first)]]


def write_outputs(paths: dict[str, Path], summaries: Sequence[GroupSummary], overview: pd.DataFrame,
                  differing: dict[str, dict[str, list[str]]]) -> None:
    """Write the CSVs and the Markdown table."""
    classes, continual = [], []
    for s in summaries:
        for evaluation, table in (("routed", s.routed), ("oracle", s.oracle)):
            if table is not None:
                classes.append(table.assign(group=s.group.name, evaluation=evaluation))
        continual.append(s.continual.assign(group=s.group.name))
    paths["classes"].parent.mkdir(parents=True, exist_ok=True)
    _columns_first(pd.concat(classes), ["group", "evaluation"]).to_csv(paths["classes"], index=False)
    _columns_first(pd.concat(continual), ["group"]).to_csv(paths["continual"], index=False)
    overview.to_csv(paths["groups"], index=False)
    md = ["# Summary", "", *(f"- **{r['group']}**: {int(r['n_runs'])} run(s), seeds {r['seeds']}: {r['runs']}"
                             for _, r in overview.iterrows())]
    if differing:
        md += ["", "Settings that differ between groups:", "",
               *(f"- `{k}`: " + "; ".join(f"{v} ({', '.join(n)})" for v, n in vals.items())
                 for k, vals in differing.items())]
    paths["markdown"].write_text("\n".join([*md, *format_side_by_side(overview, markdown=True), ""]),
                                 encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 on a user error)."""
    parser = argparse.ArgumentParser(prog="python -m moleflow.summarize",
                                     description="Mean ± std over runs, grouped by settings, groups side by side.")
    parser.add_argument("folders", nargs="+", help="experiment folders (seeds of one setting are averaged)")
    parser.add_argument("--out", default=None,
                        help="output .csv path (companions *_continual.csv, *_groups.csv, *_groups.md next to "
                             "it) or a folder; default: the runs' common parent folder, summary_<timestamp>.csv")
    args = parser.parse_args(argv)
    try:
        check_distinct(args.folders)
        groups = group_runs([load_run(folder) for folder in args.folders])
        summaries = [summarize_group(g) for g in groups]
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overview = side_by_side(summaries)
    differing = differing_settings(groups)
    print(format_report(summaries, differing, overview))
    paths = output_paths(args.folders, args.out)
    try:
        write_outputs(paths, summaries, overview, differing)
    except OSError as err:
        print(f"error: cannot write {err.filename or paths['classes']}: {err.strerror or err}; "
              "pass --out with a writable path", file=sys.stderr)
        return 2
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
