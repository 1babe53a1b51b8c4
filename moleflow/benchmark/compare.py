"""Side-by-side accuracy table: ours (routed and oracle) against the per-class nearest-neighbour baseline.

    python -m moleflow.benchmark.compare --data ROOT [ROOT ...] --classes hazelnut transistor tire \\
        --seeds 0 1 2 [--variant NAME "FLAGS" ...] [--jobs 2] [--out DIR] -- [flags for every run]

Every run is the real CLI (``run_moleflow.py``, ``--dataset folder``) in its own process: one continual
run per variant and seed over the classes in the order given, from one data root of links under ``--out``.
Variants (default): ``ours`` (the defaults) and ``paper_main`` (the paper's method exactly). Baselines,
run once each (deterministic), the task known: ``patchcore_oracle`` (PatchCore as PatchCore builds it:
its own features, every training patch of the class, k = 1, image score = max) and ``knn_our_features``
(the same nearest-neighbour scoring on our patch features). The table (per class and mean: image AUROC,
pixel AUROC, pixel AP and AUPRO in percent as mean ± std over seeds; per variant forgetting and routing
accuracy) is printed and written to ``DIR/compare.md`` and ``DIR/compare.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

METRICS = ("img_auroc", "pixel_auroc", "pixel_ap", "aupro")
SHORT = {"img_auroc": "img AUROC", "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "aupro": "AUPRO"}
BASELINES: dict[str, str] = {
    "patchcore_oracle": "--ablation_preset patchcore_oracle",
    "knn_our_features": "--anomaly_score memory --memory_size 0 --no_router --score_aggregation_mode max",
}
DEFAULT_VARIANTS: list[tuple[str, str]] = [("ours", ""), ("paper_main", "--ablation_preset paper_main")]
REPO = Path(__file__).resolve().parents[2]


def link_root(roots: Sequence[Path], classes: Sequence[str], target: Path) -> Path:
    """A data root holding one link per class, to the first of ``roots`` that has it.

    Raises:
        SystemExit: a class is in none of the roots (one line naming the roots).
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in classes:
        source = next((r / name for r in roots if (r / name).is_dir()), None)
        if source is None:
            raise SystemExit(f"error: class {name!r} is in none of {[str(r) for r in roots]}; "
                             "pass --data with the folder that holds it")
        link = target / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return target


def read_rows(path: Path, key: str = "class_name") -> dict[str, dict[str, float]]:
    """Row name (column ``key``: class name and 'mean', or metric) -> column -> value of a results CSV."""
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            out[row[key]] = {k: float(v) if v not in ("", None) else math.nan
                             for k, v in row.items() if k not in ("task_id", key)}
    return out


def run_one(name: str, flags: list[str], seed: int, data_root: Path, classes: Sequence[str], out: Path,
            common: list[str]) -> dict:
    """One continual run through the CLI; returns its final results (routed, oracle, forgetting)."""
    log_dir = out / "runs"
    experiment = f"{name}_s{seed}"
    command = [sys.executable, str(REPO / "run_moleflow.py"), "--dataset", "folder", "--data_path", str(data_root),
               "--task_classes", *classes, "--seed", str(seed), "--log_dir", str(log_dir),
               "--experiment_name", experiment, *common, *flags]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{name} seed {seed} failed: {tail[0]} (command: {shlex.join(command)})")
    exp_dir = sorted(log_dir.glob(f"{experiment}_*"))[-1]
    oracle = exp_dir / "final_results_oracle.csv"
    routed = read_rows(exp_dir / "final_results.csv")
    continual = read_rows(exp_dir / "continual_summary.csv", key="metric")
    mean = " ".join(f"{m} {100 * routed['mean'][m]:.2f}" for m in METRICS)
    print(f"  {name} seed {seed}: {time.time() - started:.0f}s, routed mean {mean} -> {exp_dir}", flush=True)
    return {"routed": routed,
            "oracle": read_rows(oracle) if oracle.exists() else None,
            "forgetting": {m: row["forgetting"] for m, row in continual.items()}, "dir": str(exp_dir),
            "baseline": is_baseline(flags)}


def is_baseline(flags: Sequence[str]) -> bool:
    """A nearest-neighbour baseline (memory alone, no flow): deterministic, so run once; no oracle row."""
    joined = " ".join(flags)
    return "patchcore_oracle" in joined or "--anomaly_score memory" in joined


def cell(values: list[float]) -> str:
    """``mean ± std`` in percent over the non-NaN values; the mean alone for one run, ``n/a`` for none."""
    kept = [100.0 * v for v in values if not math.isnan(v)]
    mean = statistics.fmean(kept) if kept else math.nan
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def build_table(classes: Sequence[str], results: dict[str, list[dict]]) -> tuple[str, list[list[str]]]:
    """Markdown table and CSV rows: one line per (class or mean, result), metric columns."""
    baselines = {n for n, runs in results.items() if n in BASELINES or runs[0].get("baseline")}
    header = ["class", "result", *[SHORT[m] for m in METRICS], "forgetting (img/pixel AUROC)", "routing"]
    rows: list[list[str]] = [header]
    for name in [*classes, "mean"]:
        for variant, runs in results.items():
            for kind in ("routed", "oracle"):
                if any(r[kind] is None for r in runs) or (variant in baselines and kind == "oracle"):
                    continue
                label = variant if variant in baselines else f"{variant} ({kind})"
                cells = [cell([r[kind][name][m] for r in runs]) for m in METRICS]
                forget, routing = "", ""
                if name == "mean" and kind == "routed" and variant not in baselines:
                    forget = " / ".join(cell([r["forgetting"][m] for r in runs]) for m in ("img_auroc", "pixel_auroc"))
                    routing = cell([r["routed"][name]["routing_acc"] for r in runs])
                rows.append([name, label, *cells, forget, routing])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines), rows


def parse(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, common = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m moleflow.benchmark.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="dataset roots in MVTec AD layout")
    parser.add_argument("--classes", nargs="+", required=True, help="classes, in task order")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of each variant (default 0 1 2)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "FLAGS"),
                        help='a variant of ours: a name and its flags in one string, e.g. w05 "--memory_weight 0.5"; '
                             'repeatable (default: ours = the defaults, and paper_main)')
    parser.add_argument("--no_baseline", action="store_true", help=f"skip the baselines ({', '.join(BASELINES)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default logs/compare_<timestamp>)")
    return parser.parse_args(argv), common


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, common = parse(argv)
    out = args.out or Path("logs") / time.strftime("compare_%Y%m%d_%H%M%S")
    for root in args.data:
        if not root.is_dir():
            raise SystemExit(f"error: data root {root} does not exist; pass --data with dataset folders")
    data_root = link_root(args.data, args.classes, out / "data")
    variants = [(n, shlex.split(f)) for n, f in (args.variant or DEFAULT_VARIANTS)]
    jobs = [(n, f, s) for n, f in variants for s in ([args.seeds[0]] if is_baseline(f) else args.seeds)]
    if not args.no_baseline:
        jobs += [(name, shlex.split(flags), args.seeds[0]) for name, flags in BASELINES.items()]
    print(f"{len(jobs)} runs over {', '.join(args.classes)} -> {out}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [(n, pool.submit(run_one, n, f, s, data_root, args.classes, out, common)) for n, f, s in jobs]
        results: dict[str, list[dict]] = {}
        for name, future in futures:
            results.setdefault(name, []).append(future.result())
    table, rows = build_table(args.classes, results)
    note = (f"Classes in task order: {' -> '.join(args.classes)}; seeds {args.seeds}; flags for every run: "
            f"{shlex.join(common) or '(none)'}; variants: "
            + "; ".join(f"{n} = {shlex.join(f) or '(defaults)'}" for n, f in variants)
            + f". Metrics in %, mean ± std over seeds; the baselines ({', '.join(BASELINES)}) are one deterministic "
              "run each, the task known.")
    (out / "compare.md").write_text(table + "\n\n" + note + "\n")
    with open(out / "compare.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    print(table + "\n\n" + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
