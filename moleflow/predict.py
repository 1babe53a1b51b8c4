"""``python -m moleflow.predict RUN_DIR INPUT [INPUT ...] --out OUT_DIR``: a trained run on new images.

Inputs are files, folders (their images, recursively) or glob patterns; any size, RGB or grey. For
each input ``OUT_DIR/predictions.csv`` gets one row (``COLUMNS``), ``OUT_DIR/maps/<n>_<name>.npy`` its
anomaly map (float32, the image's height x width, the scores' units; NaN where the model did not look:
outside the centre crop under ``--resize_mode crop``) and ``OUT_DIR/overlays/<n>_<name>.png`` a heat
map over the image. An unreadable input is a row with its error; the others go on. Exit status: 0, 1
when some input could not be read, 2 for a usage error (e.g. a folder without a checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from moleflow.config.cli import OneLineParser

COLUMNS = ["path", "routed_task", "class_name", "router_distance", "router_limit", "unknown_class", "image_score",
           "threshold", "is_anomalous", "width", "height", "map_path", "overlay_path", "error"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m moleflow.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="experiment folder of a trained run (with checkpoint.pt)")
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for predictions.csv, maps/, overlays/ "
                        "(created; must not hold a predictions.csv)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--batch_size", type=int, default=None, help="images per pass (default: the run's scoring "
                        "batch, 2x its --batch_size on the CPU, at least 128 on a GPU)")
    parser.add_argument("--task", type=int, default=None, help="score every image with this task's expert instead "
                        "of routing it (e.g. for a run trained --no_router)")
    parser.add_argument("--no_maps", action="store_true", help="write predictions.csv only (no maps, no overlays)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the summary line")
    return parser


def _number(value: Optional[float]) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def _row(p, map_path: str, overlay_path: str) -> list[str]:
    flag = "" if p.is_anomalous is None else int(p.is_anomalous)
    read = p.routed_task is not None
    return [p.path, "" if not read else p.routed_task, p.class_name, _number(p.router_distance),
            _number(p.router_limit), int(p.unknown_class) if read else "", _number(p.image_score), _number(p.threshold),
            flag, p.width or "", p.height or "", map_path, overlay_path, p.error]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if (out / "predictions.csv").exists():
        print(f"error: {out / 'predictions.csv'} exists; pass a new --out folder", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print(f"error: --batch_size {args.batch_size} must be >= 1", file=sys.stderr)
        return 2
    from moleflow.predictor import Predictor, expand_inputs
    from moleflow.trained import LOAD_ERRORS, load_trained
    try:
        trained = load_trained(args.run_dir, device=args.device)
        predictor = Predictor(trained, batch_size=args.batch_size, task=args.task)
    except (*LOAD_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.inputs)
    if not paths:
        print(f"error: no images found in {' '.join(args.inputs)}; pass image files, folders or glob patterns",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_maps:
            (out / "maps").mkdir(exist_ok=True)
            (out / "overlays").mkdir(exist_ok=True)
    except OSError as error:
        print(f"error: cannot create {out}: {error.strerror or error}; pass a writable --out", file=sys.stderr)
        return 2
    from moleflow.runner import interactive
    counts = {"images": 0, "errors": 0, "anomalous": 0, "unknown": 0}
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for n, prediction in enumerate(predictor.predict(paths, maps=not args.no_maps,
                                                         progress=not args.quiet and interactive())):
            written = _write_map(out, n, prediction, trained) if prediction.anomaly_map is not None else ("", "")
            writer.writerow(_row(prediction, *written))
            handle.flush()
            counts["images"] += 1
            counts["errors"] += bool(prediction.error)
            counts["anomalous"] += prediction.is_anomalous is True
            counts["unknown"] += prediction.unknown_class
            if prediction.error:
                print(f"error: {prediction.error}", file=sys.stderr)
    print(f"{counts['images']} input(s): {counts['anomalous']} anomalous, {counts['unknown']} of an unknown class, "
          f"{counts['errors']} unreadable; results in {out / 'predictions.csv'}")
    return 1 if counts["errors"] else 0


def _write_map(out: Path, n: int, prediction, trained) -> tuple[str, str]:
    """Save the map (.npy) and the overlay (.png); returns their paths relative to ``out``."""
    import numpy as np
    from moleflow.data.dataset import read_rgb
    from moleflow.evaluation.image_maps import heat_overlay
    stem = f"{n:05d}_{Path(prediction.path).stem}"
    np.save(out / "maps" / f"{stem}.npy", prediction.anomaly_map.astype(np.float32))
    task = prediction.routed_task
    low = trained.calibration.tasks[task].normal_level if task < len(trained.calibration.tasks) else None
    overlay = heat_overlay(read_rgb(Path(prediction.path)), prediction.anomaly_map, low, prediction.threshold)
    overlay.save(out / "overlays" / f"{stem}.png")
    return f"maps/{stem}.npy", f"overlays/{stem}.png"


if __name__ == "__main__":
    sys.exit(main())
