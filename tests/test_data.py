"""Data layer: loaders (MVTec layout, MPDD, folder, VisA), transforms, task split, demo data."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.data import (
    DATASET_CLASSES, DEMO_CLASSES, IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, DataError,
    Sample, generate_demo_dataset, list_classes, load_class_split, parse_cl_scenario,
    split_tasks, validate_samples,
)

MINI_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad_mini"


def _save(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8))
    (image.convert(mode) if mode else image).save(path)
    return path


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3))


def _rect_mask(height: int, width: int, value: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mask ``(H, W)`` with ``value`` inside box = (x0, y0, x1, y1), 0 elsewhere."""
    mask = np.zeros((height, width))
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    return mask


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two classes in MVTec layout with mixed sizes, modes, extensions and mask encodings."""
    root = tmp_path / "data"
    widget = root / "widget"
    _save(_rgb(30, 40, 0), widget / "train" / "good" / "b.png")
    _save(_rgb(40, 30, 1), widget / "train" / "good" / "a.jpg", mode="L")
    _save(_rgb(32, 32, 2), widget / "train" / "good" / "c.PNG", mode="RGBA")
    (widget / "train" / "good" / "notes.txt").write_text("not an image")
    _save(_rgb(32, 32, 3), widget / "test" / "good" / "000.png", mode="P")
    # 96 x 64 at img_size 32 scales by exactly 1/2 and crops 8 columns each side.
    _save(_rgb(64, 96, 4), widget / "test" / "scratch" / "000.png")
    _save(_rect_mask(64, 96, 254, (40, 20, 56, 36)),
          widget / "ground_truth" / "scratch" / "000_mask.png")
    _save(_rgb(64, 96, 5), widget / "test" / "scratch" / "001.JPG")
    _save(_rect_mask(64, 96, 255, (40, 20, 56, 36)),
          widget / "ground_truth" / "scratch" / "001.png", mode="1")  # plain <stem>.png, 1-bit
    _save(_rgb(64, 96, 6), widget / "test" / "dent" / "000.png")
    _save(_rect_mask(64, 96, 1, (0, 0, 96, 64)), widget / "ground_truth" / "dent" / "000_mask.png")
    gadget = root / "gadget"
    _save(_rgb(20, 20, 7), gadget / "train" / "good" / "000.png")
    _save(_rgb(20, 20, 8), gadget / "test" / "good" / "000.png")
    return root


# ---------------------------------------------------------------- loaders

def test_folder_split_is_sorted_and_masked(mvtec_root: Path) -> None:
    assert list_classes("folder", mvtec_root) == ["gadget", "widget"]
    split = load_class_split("folder", mvtec_root, "widget")
    assert [s.image_path.name for s in split.train] == ["a.jpg", "b.png", "c.PNG"]
    assert [(s.defect_type, s.image_path.name) for s in split.test] == [
        ("dent", "000.png"), ("good", "000.png"), ("scratch", "000.png"), ("scratch", "001.JPG")]
    by_name = {(s.defect_type, s.image_path.name): s for s in split.test}
    assert by_name[("good", "000.png")].mask_path is None
    assert by_name[("good", "000.png")].label == 0
    assert by_name[("scratch", "000.png")].mask_path.name == "000_mask.png"
    assert by_name[("scratch", "001.JPG")].mask_path.name == "001.png"
    assert all(s.label == 1 and s.class_name == "widget" for s in split.test if s.defect_type != "good")
    validate_samples([*split.train, *split.test])


def test_mvtec_and_mpdd_classes_keep_canonical_order(tmp_path: Path) -> None:
    for name in ("zipper", "bottle", "carpet"):
        _save(_rgb(8, 8, 0), tmp_path / name / "train" / "good" / "0.png")
    (tmp_path / "not_a_class").mkdir()
    assert list_classes("mvtec", tmp_path) == ["bottle", "carpet", "zipper"]
    assert DATASET_CLASSES["mvtec"][:3] == ["bottle", "cable", "capsule"]
    assert len(DATASET_CLASSES["mvtec"]) == 15 and len(DATASET_CLASSES["visa"]) == 12
    assert len(DATASET_CLASSES["mpdd"]) == 6


def test_missing_root_unknown_class_and_dataset(tmp_path: Path, mvtec_root: Path) -> None:
    with pytest.raises(DataError, match="--data_path") as info:
        load_class_split("mvtec", tmp_path / "nowhere", "bottle")
    assert str(tmp_path / "nowhere") in str(info.value)
    with pytest.raises(DataError, match="gadget, widget") as info:
        load_class_split("folder", mvtec_root, "sprocket")
    assert "'sprocket'" in str(info.value) and "--task_classes" in str(info.value)
    with pytest.raises(DataError, match="mvtec, visa, mpdd, folder"):
        list_classes("kitti", mvtec_root)


def test_empty_train_and_missing_test_folder(mvtec_root: Path) -> None:
    empty = mvtec_root / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="add defect-free") as info:
        load_class_split("folder", mvtec_root, "empty")
    assert str(empty / "train" / "good") in str(info.value)
    _save(_rgb(8, 8, 0), empty / "train" / "good" / "0.png")
    with pytest.raises(DataError, match="add test/good") as info:
        load_class_split("mpdd", mvtec_root, "empty")
    assert str(empty / "test") in str(info.value)


def test_defect_without_mask_names_image_and_expected_mask(mvtec_root: Path) -> None:
    image = _save(_rgb(8, 8, 0), mvtec_root / "widget" / "test" / "dent" / "001.png")
    with pytest.raises(DataError) as info:
        load_class_split("folder", mvtec_root, "widget")
    message = str(info.value)
    assert str(image) in message and "001_mask.png" in message and "add the mask" in message
    assert "\n" not in message


def test_mask_without_image_is_an_error(mvtec_root: Path) -> None:
    orphan = _save(np.zeros((8, 8)), mvtec_root / "widget" / "ground_truth" / "dent" / "007_mask.png")
    with pytest.raises(DataError, match="remove the mask or add the image") as info:
        load_class_split("folder", mvtec_root, "widget")
    assert str(orphan) in str(info.value)


def test_visa_csv(tmp_path: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("pcb1", "candle"):
        for i in range(3):
            _save(_rgb(16, 16, i), tmp_path / obj / "Normal" / f"{i:03d}.JPG")
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{obj}/Normal/{i:03d}.JPG,")
        _save(_rgb(16, 16, 9), tmp_path / obj / "Anomaly" / "000.JPG")
        _save(_rect_mask(16, 16, 255, (2, 2, 6, 6)), tmp_path / obj / "Masks" / "000.png")
        rows.append(f"{obj},test,anomaly,{obj}/Anomaly/000.JPG,{obj}/Masks/000.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_classes("visa", tmp_path) == ["candle", "pcb1"]
    split = load_class_split("visa", tmp_path, "pcb1")
    assert [s.image_path.name for s in split.train] == ["000.JPG", "001.JPG"]
    assert [(s.label, s.defect_type) for s in split.test] == [(1, "anomaly"), (0, "good")]
    assert split.test[0].mask_path == tmp_path / "pcb1" / "Masks" / "000.png"
    item = AnomalyDataset(split.test, 16)[0]
    assert item["mask"].sum() == 16 and item["label"] == 1
    with pytest.raises(DataError, match="candle, pcb1"):
        load_class_split("visa", tmp_path, "fryum")
    with pytest.raises(DataError, match="split_csv/1cls.csv"):
        load_class_split("visa", tmp_path / "pcb1", "pcb1")


# ---------------------------------------------------------------- dataset / transform

def test_items_have_shapes_modes_and_normalisation(mvtec_root: Path) -> None:
    split = load_class_split("folder", mvtec_root, "widget")
    dataset = AnomalyDataset([*split.train, *split.test], img_size=24)
    for index in range(len(dataset)):  # grey jpg, RGBA, palette, RGB png/jpg of several sizes
        item = dataset[index]
        assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 24, 24) and item["index"] == index
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    white = mvtec_root / "white.png"
    _save(np.full((10, 20, 3), 255), white)
    sample = Sample(white, 0, None, "good", "widget")
    image = AnomalyDataset([sample], 8)[0]["image"]
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 4, 4], expected, atol=1e-5, rtol=0)


def test_masks_are_binary_nearest_and_cropped_like_the_image(mvtec_root: Path) -> None:
    split = load_class_split("folder", mvtec_root, "widget")
    dataset = AnomalyDataset(split.test, img_size=32)
    expected = torch.zeros(1, 32, 32)
    expected[:, 10:18, 12:20] = 1.0   # (40..56, 20..36) / 2, minus the 8-column crop
    for name in ("000.png", "001.JPG"):  # 0/254 <stem>_mask.png and 1-bit <stem>.png
        index = next(i for i, s in enumerate(split.test)
                     if s.defect_type == "scratch" and s.image_path.name == name)
        torch.testing.assert_close(dataset[index]["mask"], expected, atol=0, rtol=0)
    dent = next(i for i, s in enumerate(split.test) if s.defect_type == "dent")
    assert dataset[dent]["mask"].min() == 1.0   # a 0/1 mask: value 1 counts as anomalous
    good = next(i for i, s in enumerate(split.test) if s.defect_type == "good")
    assert dataset[good]["mask"].sum() == 0 and dataset[good]["label"] == 0


def test_cache_decodes_each_file_once(mvtec_root: Path) -> None:
    split = load_class_split("folder", mvtec_root, "gadget")
    cached = AnomalyDataset(split.train, 16, cache=True)
    first = cached[0]["image"]
    split.train[0].image_path.unlink()
    torch.testing.assert_close(cached[0]["image"], first, atol=0, rtol=0)
    with pytest.raises(DataError):
        AnomalyDataset(split.train, 16, cache=False)[0]


def test_augmentation_is_seeded_and_off_by_default(mvtec_root: Path) -> None:
    samples = load_class_split("folder", mvtec_root, "widget").train
    plain, augmented = AnomalyDataset(samples, 16), AnomalyDataset(samples, 16, augment=True)
    torch.manual_seed(3)
    first = [augmented[i]["image"] for i in range(3)]
    torch.manual_seed(3)
    again = [augmented[i]["image"] for i in range(3)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(plain[0]["image"], plain[0]["image"], atol=0, rtol=0)
    torch.manual_seed(0)
    draws = [augmented[0]["image"] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert any(not torch.equal(plain[0]["image"], d) for d in draws)


def test_corrupt_or_truncated_image_is_named(mvtec_root: Path) -> None:
    split = load_class_split("folder", mvtec_root, "widget")
    broken = split.train[1].image_path
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="replace or remove the file") as info:
        validate_samples(split.train)
    assert str(broken) in str(info.value)
    with pytest.raises(DataError, match="cannot read image") as info:
        AnomalyDataset(split.train, 16)[1]
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    truncated = split.train[0].image_path
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DataError, match=str(truncated).replace("\\", "\\\\")):
        AnomalyDataset(split.train, 16)[0]


# ---------------------------------------------------------------- scenarios

def test_split_tasks_scenarios() -> None:
    classes = ["a", "b", "c"]
    assert split_tasks(classes, "1-1") == [["a"], ["b"], ["c"]]
    assert split_tasks(classes, "2-1") == [["a", "b"], ["c"]]
    assert split_tasks(classes, "3-3") == [["a", "b", "c"]]
    assert split_tasks(["a", "b", "c", "d", "e"], "1-3") == [["a"], ["b", "c", "d"], ["e"]]
    assert parse_cl_scenario("14-1") == (14, 1) and parse_cl_scenario(" 10-5 ") == (10, 5)
    with pytest.raises(DataError, match="lower B or add classes"):
        split_tasks(classes, "4-1")
    with pytest.raises(DataError, match="name each class once"):
        split_tasks(["a", "a"], "1-1")


@pytest.mark.parametrize("bad", ["", "1", "a-b", "0-1", "1-0", "1--1", "-1-1", "1-1-1", "2.5-1"])
def test_bad_scenario_strings(bad: str) -> None:
    with pytest.raises(DataError, match="use B-I with positive integers"):
        parse_cl_scenario(bad)


# ---------------------------------------------------------------- demo data

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_generator_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    small = {"size": 48, "n_train": 2, "n_test_good": 1, "n_test_defect": 2}
    assert generate_demo_dataset(tmp_path / "one", seed=1, **small) == DEMO_CLASSES
    generate_demo_dataset(tmp_path / "two", seed=1, **small)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    probe = tmp_path / "one" / "nut" / "train" / "good" / "000.png"
    stamp = probe.stat().st_mtime_ns
    generate_demo_dataset(tmp_path / "one", seed=1, **small)
    assert probe.stat().st_mtime_ns == stamp          # same settings: nothing rewritten
    generate_demo_dataset(tmp_path / "one", seed=2, **small)
    assert _tree(tmp_path / "one") != _tree(tmp_path / "two")   # another seed replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]   # no temp folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not a MoLE-Flow demo dataset"):
        generate_demo_dataset(tmp_path / "mine", **small)


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("demo") / "moleflow_demo"
    start = time.perf_counter()
    generate_demo_dataset(root)
    return root, time.perf_counter() - start


def test_full_demo_layout_masks_and_speed(full_demo: tuple[Path, float]) -> None:
    root, seconds = full_demo
    assert seconds < 20.0
    assert list_classes("folder", root) == sorted(DEMO_CLASSES)
    for name in DEMO_CLASSES:
        split = load_class_split("folder", root, name)
        defects = [s for s in split.test if s.label == 1]
        assert len(split.train) == 40 and len(split.test) - len(defects) == 10
        assert len(defects) == 12 and len({s.defect_type for s in defects}) >= 3
        for sample in defects:
            image = Image.open(sample.image_path)
            mask = np.asarray(Image.open(sample.mask_path))
            assert image.size == (224, 224) and image.mode == "RGB"
            assert set(np.unique(mask).tolist()) == {0, 255}
            assert 20 < (mask > 0).sum() < 0.2 * mask.size
        assert all(s.mask_path is None for s in split.test if s.label == 0)


def test_demo_defects_change_exactly_the_masked_region(full_demo: tuple[Path, float]) -> None:
    """A defect image regenerated without its defect differs from it only inside the mask."""
    from moleflow.data.demo import STREAM_TEST_DEFECT
    from moleflow.data.demo_defects import DEFECTS
    from moleflow.data.demo_render import RENDERERS
    root, _ = full_demo
    for class_index, name in enumerate(DEMO_CLASSES):
        for defect_index, defect in enumerate(DEFECTS[name]):
            rng = np.random.default_rng([0, class_index, STREAM_TEST_DEFECT, defect_index, 0])
            clean = np.round(RENDERERS[name](rng, 224).image * 255).astype(np.int16)
            shown = np.asarray(Image.open(root / name / "test" / defect / "000.png"), dtype=np.int16)
            mask = np.asarray(Image.open(root / name / "ground_truth" / defect / "000_mask.png")) > 0
            changed = np.abs(shown - clean).max(axis=2) > 0
            assert not (changed & ~mask).any()
            assert changed[mask].mean() > 0.9


def test_demo_classes_are_visibly_different(full_demo: tuple[Path, float]) -> None:
    root, _ = full_demo
    means = {name: np.mean([np.asarray(Image.open(p), dtype=np.float64).mean(axis=(0, 1))
                            for p in sorted((root / name / "train" / "good").glob("*.png"))[:5]], axis=0)
             for name in DEMO_CLASSES}
    for a in DEMO_CLASSES:
        for b in DEMO_CLASSES:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 30, (a, b)


# ---------------------------------------------------------------- real data

def test_real_mvtec_mini() -> None:
    if not MINI_MVTEC.is_dir():
        pytest.skip(f"{MINI_MVTEC} is absent")
    assert list_classes("mvtec", MINI_MVTEC) == ["hazelnut", "transistor"]
    split = load_class_split("mvtec", MINI_MVTEC, "hazelnut")
    assert len(split.train) == 50 and len(split.test) == 10
    defects = [s for s in split.test if s.label == 1]
    assert {s.defect_type for s in defects} == {"crack", "cut", "hole", "print"}
    validate_samples(split.test)
    dataset = AnomalyDataset(split.test, img_size=64)
    for index, sample in enumerate(split.test):
        mask = dataset[index]["mask"]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum() > 0) == (sample.label == 1)   # 1-bit masks are read as anomalous


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "1"])
def test_resizing_while_decoding_gives_the_same_pixels(tmp_path: Path, mode: str) -> None:
    """read_rgb_resized (no full-size copy) == read_rgb + resize_crop, for every image mode."""
    from moleflow.data.dataset import read_rgb, read_rgb_resized, resize_crop
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)).convert("I;16")
    elif mode != "RGB":
        image = image.convert(mode)
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    image.save(path)
    resized, size = read_rgb_resized(path, 32)
    expected = resize_crop(read_rgb(path), 32, Image.Resampling.BILINEAR)
    assert size == (70, 45)
    assert np.array_equal(np.asarray(resized), np.asarray(expected))
