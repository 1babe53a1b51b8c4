"""Issue 18: a trained run on new images. Per-image results, thresholds from held-out images,
``python -m moleflow.predict``, the Python API, TorchScript export and re-evaluation, end to end on
tiny generated data (always) and on the mini MVTec AD (when it is there)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MINI_MVTEC, REPO, repo_env, run_cli, tiny_flags
from moleflow.cli_main import main as train_main

SCORE_TOLERANCE = 1e-4  # the same images batched differently: float summation order only


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _module(name: str, args: list[str], cwd: Path = REPO, env_path: bool = True) -> subprocess.CompletedProcess:
    env = repo_env() if env_path else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", name, *args] if name else [sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fabric -> tile, 2 epochs, every training patch in memory; 1 of each class's 8 images held out."""
    log_dir = tmp_path_factory.mktemp("predict_run")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_main([*tiny_flags(tiny_data, log_dir, classes=("fabric", "tile")), "--memory_size", "0",
                           "--quiet"])
    assert code == 0, err.getvalue()
    (run,) = [p for p in log_dir.iterdir() if p.is_dir()]
    return run


def _input_folder(root: Path, data: Path, classes: tuple[str, ...]) -> Path:
    """The classes' test images, a non-square grey image and a corrupt file, in one folder."""
    folder = root / "inputs"
    for name in classes:
        shutil.copytree(data / name / "test", folder / name)
    grey = (np.random.default_rng(0).random((50, 90)) * 255).astype(np.uint8)
    Image.fromarray(grey, "L").save(folder / "grey_wide.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


def _check_predictions(out: Path, folder: Path, run: Path, data: Path, classes: tuple[str, ...]) -> None:
    """One row per input, maps the size of each input, the corrupt one with an error, the test images'
    scores and experts those of per_image_scores.csv."""
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in _rows(out / "predictions.csv")}
    inputs = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert sorted(rows) == sorted(inputs)
    bad = rows.pop("corrupt.png")
    assert "corrupt.png" in bad["error"] and bad["image_score"] == "" and bad["map_path"] == ""
    for name, row in rows.items():
        assert row["error"] == "", row
        with Image.open(folder / name) as image:
            size = image.size
        anomaly_map = np.load(out / row["map_path"])
        assert anomaly_map.shape == (size[1], size[0]) and anomaly_map.dtype == np.float32
        assert (out / row["overlay_path"]).stat().st_size > 100
    grey = np.load(out / rows["grey_wide.png"]["map_path"])
    assert np.isnan(grey[:, :10]).all() and np.isfinite(grey[:, 25:65]).all()  # centre crop scored, sides not
    evaluated = {r["path"]: r for r in _rows(run / "per_image_scores.csv")}
    assert len(evaluated) == sum(1 for c in classes for _ in (data / c / "test").rglob("*.png"))
    for path, expected in evaluated.items():
        got = rows[_as_input(path)]
        assert int(got["routed_task"]) == int(expected["routed_task"])
        assert float(got["image_score"]) == pytest.approx(float(expected["image_score"]), abs=SCORE_TOLERANCE)
        assert got["is_anomalous"] == expected["is_anomalous"] and got["unknown_class"] == "0"


def _as_input(data_relative: str) -> str:
    """<class>/test/<defect>/<file> (per_image_scores.csv) -> <class>/<defect>/<file> (the input folder)."""
    name, _, rest = data_relative.split("/", 2)
    return f"{name}/{rest}"


# ------------------------------------------------------------------------------ the run's own files

def test_per_image_scores_and_defect_types(tiny_run: Path, tiny_data: Path) -> None:
    rows = _rows(tiny_run / "per_image_scores.csv")
    assert list(rows[0]) == ["task_id", "class_name", "path", "defect_type", "label", "image_score", "routed_task",
                             "router_distance", "threshold", "is_anomalous"]
    assert len(rows) == 12 and {r["class_name"] for r in rows} == {"fabric", "tile"}
    for row in rows:
        assert (tiny_data / row["path"]).is_file() and row["path"].split("/")[2] == row["defect_type"]
        assert int(row["label"]) == (row["defect_type"] != "good")
        assert int(row["is_anomalous"]) == (float(row["image_score"]) > float(row["threshold"]))
    from moleflow.evaluation.metrics import auroc
    by_type = _rows(tiny_run / "results_by_defect_type.csv")
    assert len(by_type) == 6  # 2 classes x 3 defect types
    for entry in by_type:
        mine = [r for r in rows if r["class_name"] == entry["class_name"]]
        good = [float(r["image_score"]) for r in mine if r["label"] == "0"]
        bad = [float(r["image_score"]) for r in mine if r["defect_type"] == entry["defect_type"]]
        assert (int(entry["n_good"]), int(entry["n_defect"])) == (len(good), len(bad)) == (3, 1)
        assert float(entry["img_auroc"]) == pytest.approx(auroc([0] * 3 + [1], good + bad), abs=1e-6)


def test_thresholds_come_from_held_out_images_that_were_never_trained_on(tiny_run: Path) -> None:
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["config"]["val_fraction"] == 0.1 and config["held_out_images"] == {"fabric": 1, "tile": 1}
    assert "quantile" in config["threshold_rule"]
    grid = 8 * 8  # 64 px, stride 8
    for task, cal in enumerate(ckpt["calibration"]):
        assert len(cal["held_out_scores"]) == 1 and cal["threshold"] == pytest.approx(cal["held_out_scores"][0])
        assert cal["router_limit"] == pytest.approx(3.0 * cal["held_out_distance_max"])
        assert int(ckpt["router"]["prototypes"][task]["num_samples"]) == 7  # 8 images, 1 held out
        assert ckpt["memory"][task]["bank"].shape[0] == 7 * grid  # --memory_size 0: every training patch
    final = _rows(tiny_run / "final_results.csv")
    per_image = _rows(tiny_run / "per_image_scores.csv")
    from moleflow.evaluation.thresholds import f1_max
    for row in final[:-1]:
        mine = [r for r in per_image if r["class_name"] == row["class_name"]]
        called = [r["is_anomalous"] == "1" for r in mine]
        defect = [r["label"] == "1" for r in mine]
        hits = sum(c and d for c, d in zip(called, defect))
        precision = hits / sum(called) if any(called) else 0.0
        assert float(row["precision_at_threshold"]) == pytest.approx(precision, abs=1e-6)
        assert float(row["recall_at_threshold"]) == pytest.approx(hits / sum(defect), abs=1e-6)
        labels, scores = [int(d) for d in defect], [float(r["image_score"]) for r in mine]
        assert float(row["f1_max_test_picked"]) == pytest.approx(f1_max(labels, scores), abs=1e-6)
    thresholds = _rows(tiny_run / "thresholds.csv")
    assert [r["classes"] for r in thresholds] == ["fabric", "tile"] and all(r["threshold"] for r in thresholds)


# ------------------------------------------------------------------------------ predict

def test_predict_end_to_end_on_tiny_data(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = _input_folder(tmp_path, tiny_data, ("fabric", "tile"))
    proc = _module("moleflow.predict", [str(tiny_run), str(folder), "--out", str(tmp_path / "out")])
    assert proc.returncode == 1, proc.stderr  # one input could not be read
    assert proc.stderr.count("error: ") == 1 and "corrupt.png" in proc.stderr
    assert "14 input(s)" in proc.stdout  # 12 test images, the grey one, the corrupt one
    _check_predictions(tmp_path / "out", folder, tiny_run, tiny_data, ("fabric", "tile"))


def test_predict_flags_images_of_an_unknown_class(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    proc = _module("moleflow.predict", [str(tiny_run), str(tiny_data / "nut" / "test" / "*" / "*.png"),
                                        "--out", str(tmp_path / "out"), "--no_maps"])
    assert proc.returncode == 0, proc.stderr
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 6 and all(r["map_path"] == "" for r in rows)
    for row in rows:  # the nut was never learned: farther than the router limit, no decision
        assert row["unknown_class"] == "1" and row["is_anomalous"] == "", row
        assert float(row["router_distance"]) > float(row["router_limit"])


def test_predict_refuses_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    proc = _module("moleflow.predict", [str(tmp_path), str(tmp_path), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: no checkpoint.pt in") and str(tmp_path) in proc.stderr


def test_maps_are_placed_back_at_the_image_resolution() -> None:
    from moleflow.evaluation.image_maps import crop_box, map_to_image
    square = torch.arange(16.0).repeat(16, 1)  # column index, 16 x 16
    wide = map_to_image(square, 90, 45, "crop")  # the model saw the centre 45 x 45
    assert crop_box(90, 45, 16) == (23, 0, 68, 45)
    assert torch.isnan(wide[:, :23]).all() and torch.isnan(wide[:, 68:]).all() and torch.isfinite(wide[:, 23:68]).all()
    assert (wide[0, 23:68].diff() >= 0).all()  # the crop's left-to-right order is kept
    squashed = map_to_image(square, 90, 45, "squash")
    assert squashed.shape == (45, 90) and torch.isfinite(squashed).all()
    same = map_to_image(square, 32, 32, "crop")  # a square image: the whole image, resized
    torch.testing.assert_close(same, map_to_image(square, 32, 32, "squash"))


# ------------------------------------------------------------------------------ the Python API and export

def test_python_api_scores_paths_and_images_in_memory(tiny_run: Path, tiny_data: Path) -> None:
    import moleflow
    model = moleflow.load(tiny_run, device="cpu")
    assert model.classes == ["fabric", "tile"] and all(t is not None for t in model.thresholds)
    path = tiny_data / "tile" / "test" / "crack" / "000.png"
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    grey = (np.random.default_rng(1).random((40, 70)) * 255).astype(np.uint8)
    by_path, by_image, by_array = model.predict([path, rgb, grey])
    expected = {r["path"]: r for r in _rows(tiny_run / "per_image_scores.csv")}["tile/test/crack/000.png"]
    assert by_path.class_name == "tile" and by_path.routed_task == 1 and by_path.error == ""
    assert by_path.image_score == pytest.approx(float(expected["image_score"]), abs=SCORE_TOLERANCE)
    assert by_image.image_score == pytest.approx(by_path.image_score, abs=SCORE_TOLERANCE)
    assert by_path.is_anomalous == bool(int(expected["is_anomalous"]))
    assert by_path.anomaly_map.shape == (64, 64) and by_array.anomaly_map.shape == (40, 70)
    assert by_array.path == "<image 2>" and np.isfinite(by_array.image_score)
    folder = model.predict(str(tiny_data / "fabric" / "test"), maps=False)
    assert len(folder) == 6 and all(p.anomaly_map is None and p.class_name == "fabric" for p in folder)


def test_import_moleflow_stays_light() -> None:
    proc = _module("", ["-X", "importtime", "-c", "import moleflow; moleflow.load"])
    assert proc.returncode == 0, proc.stderr
    assert not any(line.rsplit("|", 1)[-1].strip() in ("torch", "timm") for line in proc.stderr.splitlines())


def test_torchscript_export_matches_predict_without_the_package(tiny_run: Path, tmp_path: Path) -> None:
    proc = _module("moleflow.export", [str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "s.pt")])
    assert proc.returncode == 0, proc.stderr
    import moleflow
    model = moleflow.load(tiny_run, device="cpu")
    rows = _rows(tiny_run / "per_image_scores.csv")
    from moleflow.build import build_dataset
    from moleflow.data import Sample
    data = Path(model.trained.config.data_path)
    dataset = build_dataset(model.trained.config, [Sample(data / r["path"], 0, None, "", "") for r in rows])
    torch.save(torch.stack([dataset[i]["image"] for i in range(len(dataset))]), tmp_path / "images.pt")
    script = ("import json, sys, torch\n"
              "extra = {'moleflow.json': ''}\n"
              "scorer = torch.jit.load(sys.argv[1], _extra_files=extra)\n"
              "meta = json.loads(extra['moleflow.json'])\n"
              "x = torch.load(sys.argv[2])\n"
              "outs = [scorer(x[i:i + 5]) for i in range(0, len(x), 5)]\n"
              "print(json.dumps({'meta': meta, 'scores': torch.cat([o[0] for o in outs]).tolist(),\n"
              "                  'tasks': torch.cat([o[2] for o in outs]).tolist(), 'maps': list(outs[0][1].shape)}))\n")
    (tmp_path / "load.py").write_text(script)
    alone = _module("", [str(tmp_path / "load.py"), str(tmp_path / "s.pt"), str(tmp_path / "images.pt")],
                    cwd=tmp_path, env_path=False)  # moleflow is not importable here
    assert alone.returncode == 0, alone.stderr
    got = json.loads(alone.stdout)
    assert got["meta"]["img_size"] == 64 and got["meta"]["mean"] == [0.485, 0.456, 0.406]
    assert got["meta"]["outputs"][0] == "image_scores" and got["maps"] == [5, 64, 64]
    predicted = model.predict([data / r["path"] for r in rows], maps=False)
    assert got["tasks"] == [p.routed_task for p in predicted]
    np.testing.assert_allclose(got["scores"], [p.image_score for p in predicted], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ re-evaluation

def test_reevaluate_writes_a_new_folder_with_other_scoring(tiny_run: Path, tmp_path: Path) -> None:
    same = _module("moleflow.reevaluate", [str(tiny_run), "--log_dir", str(tmp_path / "same"), "--quiet"])
    assert same.returncode == 0, same.stderr
    (folder,) = (tmp_path / "same").iterdir()
    for name in ("per_image_scores.csv", "results_by_defect_type.csv", "thresholds.csv", "final_results.csv"):
        assert (folder / name).read_bytes() == (tiny_run / name).read_bytes(), name  # nothing changed: same numbers
    assert not (folder / "matrix_img_auroc.csv").exists()
    proc = _module("moleflow.reevaluate", [str(tiny_run), "--score_aggregation_mode", "max", "--log_dir",
                                           str(tmp_path / "max"), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    (folder,) = (tmp_path / "max").iterdir()
    config = json.loads((folder / "config.json").read_text())
    assert config["reevaluated_from"] == str(tiny_run) and config["config"]["score_aggregation_mode"] == "max"
    assert config["changed"] == {"score_aggregation_mode": {"from": "top_k", "to": "max"}}
    before = [float(r["image_score"]) for r in _rows(tiny_run / "per_image_scores.csv")]
    after = [float(r["image_score"]) for r in _rows(folder / "per_image_scores.csv")]
    assert all(a >= b - 1e-6 for a, b in zip(after, before)) and after != before  # max >= mean of the top 3
    refused = _module("moleflow.reevaluate", [str(tiny_run), "--memory_weight", "0.5", "--anomaly_score", "flow"])
    assert refused.returncode == 2 and refused.stderr.startswith("error: --memory_weight needs")


# ------------------------------------------------------------------------------ real images (when present)

@pytest.mark.skipif(not MINI_MVTEC.is_dir(), reason="../shared/data/mvtec_ad_mini is not here")
def test_train_then_predict_on_the_mini_mvtec(tmp_path: Path) -> None:
    """The issue's 'done when': a small run on the mini MVTec AD, then predict on a folder of its test
    images, a non-square grey image and a corrupt file (about 30 s on 2 cores)."""
    classes = ("hazelnut", "transistor")
    proc = run_cli(["--dataset", "folder", "--data_path", str(MINI_MVTEC), "--backbone_name", "efficientnet_lite0",
                    "--img_size", "128", "--feature_dim", "64", "--lora_rank", "4", "--num_coupling_layers", "2",
                    "--num_epochs", "2", "--batch_size", "8", "--memory_size", "1000", "--no_eval_oracle",
                    "--log_dir", str(tmp_path / "logs"), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "logs").iterdir()
    folder = _input_folder(tmp_path, MINI_MVTEC, classes)
    out = _module("moleflow.predict", [str(run), str(folder), "--out", str(tmp_path / "out")])
    assert out.returncode == 1 and "corrupt.png" in out.stderr, out.stderr
    _check_predictions(tmp_path / "out", folder, run, MINI_MVTEC, classes)
