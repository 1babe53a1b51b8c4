"""Reading experiment folders, grouping runs by their settings, and mean ± std over each group
(the statistics behind ``python -m moleflow.summarize``; see that module for the rules)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

RESULT_FILE = "final_results.csv"
ORACLE_FILE = "final_results_oracle.csv"
CONTINUAL_FILE = "continual_summary.csv"
CONFIG_FILE = "config.json"
METRIC_COLUMNS: tuple[str, ...] = ("routing_acc", "img_auroc", "pixel_auroc", "img_ap", "pixel_ap", "aupro")
KEY_COLUMNS: tuple[str, ...] = ("task_id", "class_name")
CONTINUAL_COLUMNS: tuple[str, ...] = ("final_mean", "forgetting", "bwt")
# config.json fields that do not change a run's results: runs differing only in these are averaged.
BOOKKEEPING: frozenset[str] = frozenset({
    "seed", "experiment_name", "log_dir", "resume", "device", "quiet", "num_workers", "run_diagnostics",
    "eval_oracle", "cuda_graphs", "compile_ahead", "use_feature_cache", "feature_cache", "feature_cache_max_gb"})
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
    twice = table["class_name"].duplicated()
    if twice.any():
        raise SummaryError(f"{path} lists a class twice: {sorted(set(table['class_name'][twice]))}")
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
    for i, group in enumerate(groups):  # values cut short by display() could give two groups one name
        if names.count(group.name) > 1:
            group.name += f" #{names[:i + 1].count(group.name)}"
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
    routed = summarize_runs([r.final for r in group.runs], [r.folder for r in group.runs])
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
        oracle = s.oracle.set_index("class_name").loc["mean"] if s.oracle is not None else None
        continual = s.continual.set_index("metric")
        stats = ("mean", "std")
        row.update({f"{m}_{x}": mean[f"{m}_{x}"] for m in METRIC_COLUMNS for x in stats})
        row["n_oracle"] = 0 if s.oracle is None else int(s.oracle["n_runs"].iloc[0])
        row.update({f"oracle_{m}_{x}": math.nan if oracle is None else oracle[f"{m}_{x}"]
                    for m in METRIC_COLUMNS[1:] for x in stats})
        row.update({f"{column}_{m}_{x}": continual.loc[m, f"{column}_{x}"]
                    for column in ("forgetting", "bwt") for m in METRIC_COLUMNS for x in stats})
        rows.append(row)
    return pd.DataFrame(rows)
