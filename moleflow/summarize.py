"""Mean ± std over runs, grouped by their settings, with the groups side by side.

Usage::

    python -m moleflow.summarize logs/run_a logs/run_b ... [--out PATH]

Each folder is an experiment folder written by ``run_moleflow.py``: ``config.json``,
``final_results.csv`` (one row per class, last row ``mean``), ``continual_summary.csv`` (final mean,
forgetting FM and backward transfer BWT per metric) and, when the run evaluated it,
``final_results_oracle.csv`` (the true task given).

Runs are grouped by their settings: the resolved fields of ``config.json`` (``amp``, ``tf32`` and
``compile_flow`` as they acted, from its ``effective`` record, and the resolved task list). Fields
that do not change the results (``BOOKKEEPING``: seed, names, folders, device, ...) are left out, so
the seeds of one configuration are averaged and runs whose settings differ in anything else never
are. A field missing from an older run's ``config.json`` counts as ``unknown``: such runs are grouped
only with runs that lack the same fields and agree on the rest. A group is named by its
``ablation_preset``, plus the settings that tell it from other groups of the same preset.

The standard deviation is the sample standard deviation (ddof = 1) over the runs of a group; it is
NaN for a single run. A NaN in any run (e.g. routing accuracy, not measured when the true task was
given) makes that cell's mean NaN: nothing is skipped. Files written (default: next to the runs, in
their common parent folder, ``summary_<timestamp>*``; ``--out`` a ``.csv`` path or a folder):

- ``summary_<ts>.csv``: per group, evaluation (``routed``/``oracle``) and class (and the ``mean``
  row): ``n_runs`` and ``<metric>_mean``, ``<metric>_std``;
- ``summary_<ts>_continual.csv``: per group and metric: final mean, forgetting and BWT, mean and std;
- ``summary_<ts>_groups.csv`` and ``.md``: one row per group side by side (routed means, oracle
  means, forgetting, BWT), its runs, seeds and distinguishing settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

RESULT_FILE = "final_results.csv"
ORACLE_FILE = "final_results_oracle.csv"
CONTINUAL_FILE = "continual_summary.csv"
CONFIG_FILE = "config.json"
METRIC_COLUMNS: tuple[str, ...] = ("routing_acc", "img_auroc", "pixel_auroc", "img_ap",
                                   "pixel_ap", "aupro")
KEY_COLUMNS: tuple[str, ...] = ("task_id", "class_name")
CONTINUAL_COLUMNS: tuple[str, ...] = ("final_mean", "forgetting", "bwt")
# config.json fields that do not change a run's results: runs differing only in these are averaged.
BOOKKEEPING: frozenset[str] = frozenset({
    "seed", "experiment_name", "log_dir", "resume", "device", "quiet", "num_workers", "run_diagnostics",
    "eval_oracle", "cuda_graphs", "compile_ahead"})
# Switches recorded again under config.json's "effective" as they acted on the machine (off without CUDA).
EFFECTIVE_KEYS: tuple[str, ...] = ("amp", "tf32", "compile_flow")
UNKNOWN = "unknown"  # a field missing from an older run's config.json
SHORT = {"routing_acc": "routing", "img_auroc": "img AUROC", "pixel_auroc": "pixel AUROC",
         "img_ap": "img AP", "pixel_ap": "pixel AP", "aupro": "AUPRO"}


class SummaryError(Exception):
    """A run folder or an output that cannot be used; the message is one actionable line."""


@dataclasses.dataclass
class Run:
    """One experiment folder's results and settings."""

    folder: str
    settings: dict[str, str]            # setting -> JSON text of its value (UNKNOWN when missing)
    seed: str
    final: pd.DataFrame                 # final_results.csv indexed by class_name
    oracle: Optional[pd.DataFrame]      # final_results_oracle.csv, None when the run has none
    continual: pd.DataFrame             # continual_summary.csv indexed by metric


@dataclasses.dataclass
class Group:
    """Runs with equal settings (all but BOOKKEEPING)."""

    name: str
    runs: list[Run]
    settings: dict[str, str]
    distinct: dict[str, str]            # the settings that tell it from other groups of its preset


# ------------------------------------------------------------------------------------------- reading

def load_results(path: Path) -> pd.DataFrame:
    """Read a ``final_results*.csv``; the table indexed by ``class_name``.

    Raises:
        SummaryError: If the file lacks columns or lists a class twice.
    """
    table = pd.read_csv(path, dtype={"class_name": str, "task_id": str})
    missing = [c for c in (*KEY_COLUMNS, *METRIC_COLUMNS) if c not in table.columns]
    if missing:
        raise SummaryError(f"{path} lacks column(s) {', '.join(missing)}")
    if table["class_name"].duplicated().any():
        raise SummaryError(f"{path} lists a class twice: "
                           f"{sorted(set(table['class_name'][table['class_name'].duplicated()]))}")
    return table.set_index("class_name")


def load_continual(path: Path) -> pd.DataFrame:
    """Read ``continual_summary.csv``; the table indexed by metric with final_mean, forgetting, bwt."""
    table = pd.read_csv(path, dtype={"metric": str})
    missing = [c for c in ("metric", *CONTINUAL_COLUMNS) if c not in table.columns]
    if missing:
        raise SummaryError(f"{path} lacks column(s) {', '.join(missing)}")
    return table.set_index("metric")


def load_settings(path: Path) -> tuple[dict[str, str], str]:
    """A run's settings (JSON text per field, bookkeeping fields left out) and its seed."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SummaryError(f"{path} is not readable JSON ({err}); pass folders written by run_moleflow.py")
    config = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(config, dict):
        raise SummaryError(f"{path} has no 'config' record; pass folders written by run_moleflow.py")
    values = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    effective = payload.get("effective")
    if isinstance(effective, dict):
        values.update({k: effective[k] for k in EFFECTIVE_KEYS if k in effective})
    if "tasks" in payload:
        values["tasks"] = payload["tasks"]
    settings = {k: json.dumps(v, sort_keys=True) for k, v in values.items()}
    return settings, str(config.get("seed", UNKNOWN))


def load_run(folder: str) -> Run:
    """Read one experiment folder.

    Raises:
        SummaryError: If a required file is missing or malformed (one line naming it).
    """
    root = Path(folder)
    for name in (CONFIG_FILE, RESULT_FILE, CONTINUAL_FILE):
        if not (root / name).is_file():
            raise SummaryError(f"{folder} has no {name} (expected {root / name}); pass experiment "
                               "folders written by run_moleflow.py that finished")
    settings, seed = load_settings(root / CONFIG_FILE)
    oracle = load_results(root / ORACLE_FILE) if (root / ORACLE_FILE).is_file() else None
    return Run(folder, settings, seed, load_results(root / RESULT_FILE), oracle,
               load_continual(root / CONTINUAL_FILE))


def check_distinct(folders: Sequence[str]) -> None:
    """Refuse a folder given twice (same resolved path)."""
    seen: dict[str, str] = {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise SummaryError(f"folder {real} given twice (as {seen[real]!r} and {folder!r}); pass each run once")
        seen[real] = folder


# ------------------------------------------------------------------------------------------ grouping

def display(text: str, limit: int = 60) -> str:
    """A setting's JSON text as a short readable value: lists joined by commas, strings unquoted."""
    if text == UNKNOWN:
        return UNKNOWN
    value = json.loads(text)
    out = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else str(value)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of runs with equal settings, in the order of first appearance, each named.

    A field that some runs record and others lack counts as ``unknown`` for the latter.
    """
    keys = sorted({k for run in runs for k in run.settings})
    by_key: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        by_key.setdefault(tuple(run.settings.get(k, UNKNOWN) for k in keys), []).append(run)
    groups = [Group("", members, dict(zip(keys, signature)), {}) for signature, members in by_key.items()]
    presets = [display(g.settings.get("ablation_preset", UNKNOWN)) for g in groups]
    for preset in dict.fromkeys(presets):
        same = [g for g, p in zip(groups, presets) if p == preset]
        varying = [k for k in keys if k != "ablation_preset" and len({g.settings[k] for g in same}) > 1]
        for group in same:
            group.distinct = {k: group.settings[k] for k in varying}
            parts = [] if preset == UNKNOWN else [preset]
            parts += [f"{k}={display(v)}" for k, v in group.distinct.items()]
            group.name = " ".join(parts) or "preset unknown"
    names = [g.name for g in groups]
    for group in groups:  # values cut short by display() could give two groups one name
        if names.count(group.name) > 1:
            group.name += f" #{names[:groups.index(group) + 1].count(group.name)}"
    return groups


def differing_settings(groups: Sequence[Group]) -> dict[str, dict[str, list[str]]]:
    """Setting -> {shown value -> names of the groups with it}, for settings not equal in all groups."""
    out: dict[str, dict[str, list[str]]] = {}
    for key in groups[0].settings if groups else []:
        if len({g.settings[key] for g in groups}) > 1:
            values: dict[str, list[str]] = {}
            for group in groups:
                values.setdefault(display(group.settings[key]), []).append(group.name)
            out[key] = values
    return out


# ------------------------------------------------------------------------------------------ statistics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; NaN for one value); a NaN value makes both NaN."""
    array = np.asarray(values, dtype=float)
    if np.isnan(array).any():
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _cell(value: Any) -> float:
    return math.nan if value is None or (isinstance(value, str) and not value.strip()) else float(value)


def summarize_runs(tables: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std over runs for each class row (including the ``mean`` row).

    Args:
        tables: One ``load_results`` table per run.
        names: Run names for error messages.

    Returns:
        Columns ``task_id, class_name, n_runs, <metric>_mean, <metric>_std`` in the first run's
        row order.

    Raises:
        SummaryError: If the runs do not list the same classes.
    """
    classes = list(tables[0].index)
    for table, name in zip(tables[1:], names[1:]):
        if set(table.index) != set(classes):
            raise SummaryError(f"{name} has classes {sorted(table.index)} but {names[0]} has "
                               f"{sorted(classes)}; summarise runs of the same task sequence")
    rows = []
    for cls in classes:
        row: dict[str, Any] = {"task_id": tables[0].loc[cls, "task_id"], "class_name": cls,
                               "n_runs": len(tables)}
        for metric in METRIC_COLUMNS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([_cell(t.loc[cls, metric]) for t in tables])
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_continual(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per metric: ``n_runs`` and mean and sample std over runs of final_mean, forgetting and BWT.

    A metric a run did not record (routing without the router) is NaN for that run.
    """
    metrics = list(dict.fromkeys([*METRIC_COLUMNS, *(m for t in tables for m in t.index)]))
    rows = []
    for metric in metrics:
        row: dict[str, Any] = {"metric": metric, "n_runs": len(tables)}
        for column in CONTINUAL_COLUMNS:
            values = [_cell(t.loc[metric, column]) if metric in t.index else math.nan for t in tables]
            row[f"{column}_mean"], row[f"{column}_std"] = mean_std(values)
        rows.append(row)
    return pd.DataFrame(rows)


@dataclasses.dataclass
class GroupSummary:
    """The statistics of one group."""

    group: Group
    routed: pd.DataFrame
    oracle: Optional[pd.DataFrame]      # over the runs that have final_results_oracle.csv
    continual: pd.DataFrame


def summarize_group(group: Group) -> GroupSummary:
    """Class tables (routed, oracle) and the continual table of one group."""
    names = [r.folder for r in group.runs]
    routed = summarize_runs([r.final for r in group.runs], names)
    with_oracle = [r for r in group.runs if r.oracle is not None]
    oracle = summarize_runs([r.oracle for r in with_oracle], [r.folder for r in with_oracle]) if with_oracle else None
    return GroupSummary(group, routed, oracle, summarize_continual([r.continual for r in group.runs]))


def side_by_side(summaries: Sequence[GroupSummary]) -> pd.DataFrame:
    """One row per group: its runs, then the mean row (routed, oracle) and forgetting and BWT per metric."""
    rows = []
    for s in summaries:
        g = s.group
        row: dict[str, Any] = {
            "group": g.name, "ablation_preset": display(g.settings.get("ablation_preset", UNKNOWN)),
            "settings": " ".join(f"{k}={display(v)}" for k, v in g.distinct.items()),
            "n_runs": len(g.runs), "seeds": " ".join(r.seed for r in g.runs),
            "runs": ";".join(os.path.basename(os.path.normpath(r.folder)) for r in g.runs)}
        mean = s.routed.set_index("class_name").loc["mean"]
        for m in METRIC_COLUMNS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean[f"{m}_mean"], mean[f"{m}_std"]
        oracle = s.oracle.set_index("class_name").loc["mean"] if s.oracle is not None else None
        row["n_oracle"] = 0 if s.oracle is None else int(s.oracle["n_runs"].iloc[0])
        for m in METRIC_COLUMNS[1:]:
            for stat in ("mean", "std"):
                row[f"oracle_{m}_{stat}"] = math.nan if oracle is None else oracle[f"{m}_{stat}"]
        continual = s.continual.set_index("metric")
        for column in ("forgetting", "bwt"):
            for m in METRIC_COLUMNS:
                for stat in ("mean", "std"):
                    row[f"{column}_{m}_{stat}"] = continual.loc[m, f"{column}_{stat}"]
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ formatting

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
        lines += ["", f"== {g.name}: {len(g.runs)} run(s), seeds {' '.join(r.seed for r in g.runs)}",
                  *(f"   {r.folder}" for r in g.runs), "", "final results, routed (%):", *format_classes(s.routed)]
        if s.oracle is not None:
            lines += ["", f"final results, oracle: true task given ({int(s.oracle['n_runs'].iloc[0])} run(s), %):",
                      *format_classes(s.oracle)]
        lines += ["", "continual (%, percent points):", *format_continual(s.continual)]
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) < len(seeds):
            lines.append(f"warning: group {g.name} averages runs with the same seed ({' '.join(seeds)})")
    lines += ["", "settings that differ between groups:" if differing else
              f"all {sum(len(s.group.runs) for s in summaries)} run(s) have the same settings"]
    for key, values in differing.items():
        lines.append(f"  {key}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in values.items()))
    lines += format_side_by_side(overview)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ output

def output_paths(folders: Sequence[str], out: Optional[str], now: Optional[_dt.datetime] = None) -> dict[str, Path]:
    """Where the files go: ``--out`` (a ``.csv`` path, or a folder) or the runs' common parent folder,
    named ``summary_<timestamp>`` (a suffix keeps an earlier summary of the same second)."""
    if out is not None and not (out.endswith(os.sep) or os.path.isdir(out)):
        base = Path(out[:-4] if out.endswith(".csv") else out)
    else:
        parent = Path(out) if out is not None else Path(os.path.commonpath(
            [os.path.dirname(os.path.realpath(f)) for f in folders]))
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
        base, suffix = parent / f"summary_{stamp}", 1
        while base.with_name(base.name + ".csv").exists():
            base, suffix = parent / f"summary_{stamp}_{suffix}", suffix + 1
    return {"classes": base.with_name(base.name + ".csv"),
            "continual": base.with_name(base.name + "_continual.csv"),
            "groups": base.with_name(base.name + "_groups.csv"),
            "markdown": base.with_name(base.name + "_groups.md")}


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
