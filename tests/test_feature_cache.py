"""The feature cache: a later run reads what an earlier one extracted, with identical results;
corrupt, stale and concurrent entries; ``python -m moleflow.cache``; the decoding path."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, only_experiment, repo_env, tiny_flags
from moleflow.build import build_backbone, build_dataset
from moleflow.cli_main import main
from moleflow.config.ablation import AblationConfig, apply_overrides
from moleflow.data import load_class_split
from moleflow.extractors.cache import STALE_S, TOUCH_S, FeatureCache
from moleflow.extractors.cache_files import (RUN_BYTES, RUN_ENTRIES, CacheIndex, Location, cache_entries, new_segment,
                                             read_fully, runs, write_fully)
from moleflow.extractors.features import extract_features
from moleflow.extractors.source import FeatureSource

CPU = torch.device("cpu")
COUNT = re.compile(r"(.+): (\d+) image\(s\) from the feature cache, (\d+) extracted")


def _run(tiny_data: Path, log_dir: Path, *extra: str) -> Path:
    assert main([*tiny_flags(tiny_data, log_dir, classes=("fabric", "tile"), epochs=1), "--quiet", *extra]) == 0
    return only_experiment(log_dir)


def _counts(run: Path) -> dict[str, tuple[int, int]]:
    """training.log: what -> (images from the cache, images extracted)."""
    found = {}
    for line in (run / "training.log").read_text().splitlines():
        match = COUNT.search(line.split(" | ", 1)[-1])
        if match:
            found[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return found


@pytest.fixture(scope="module")
def cached_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run that fills a fresh cache, a second run on it, and a run without the cache."""
    root = tmp_path_factory.mktemp("cached_runs")
    cache = str(root / "cache")
    return {"cache": root / "cache",
            "first": _run(tiny_data, root / "first", "--feature_cache", cache),
            "second": _run(tiny_data, root / "second", "--feature_cache", cache),
            "none": _run(tiny_data, root / "none", "--no_feature_cache")}


def test_a_second_run_reads_every_image_from_the_cache_with_identical_results(cached_runs: dict) -> None:
    first, second, none = _counts(cached_runs["first"]), _counts(cached_runs["second"]), _counts(cached_runs["none"])
    assert set(first) == set(second) == set(none) == {
        "task 0 features", "task 0 held-out features", "fabric test features",
        "task 1 features", "task 1 held-out features", "tile test features"}
    assert all(cached == 0 and extracted > 0 for cached, extracted in first.values())
    assert all(extracted == 0 and cached == first[what][1] for what, (cached, extracted) in second.items())
    assert none == first
    results = [(cached_runs[r] / "final_results.csv").read_bytes() for r in ("first", "second", "none")]
    assert results[0] == results[1] == results[2]
    assert len(cache_entries(cached_runs["cache"])) == sum(extracted for _, extracted in first.values())


def _tiny(tmp_path: Path, tiny_data: Path) -> tuple[AblationConfig, torch.nn.Module, list]:
    cfg = apply_overrides(AblationConfig(), {"backbone_name": "efficientnet_lite0", "img_size": 64, "feature_dim": 8,
                                             "batch_size": 4, "feature_cache": str(tmp_path / "cache")})
    return cfg, build_backbone(cfg, CPU, weights="random"), load_class_split("folder", tiny_data, "fabric").test


def _forget_one(root: Path) -> None:
    """Drop the entry with the smallest key from the cache's index (its image is then extracted)."""
    index = CacheIndex(root)
    index.remove([min(index.entries(), key=lambda entry: entry.key)])
    index.close()


def _source(cfg: AblationConfig, extractor: torch.nn.Module, warnings: list[str]) -> FeatureSource:
    cache = FeatureCache(Path(cfg.feature_cache), {"test": 1}, 10**9, warn=warnings.append)
    return FeatureSource(extractor, CPU, cfg.batch_size, workers=0, cache=cache)


def test_the_pipeline_gives_the_features_and_masks_of_the_plain_extraction(tiny_data: Path, tmp_path: Path) -> None:
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    dataset = build_dataset(cfg, samples)
    plain = extract_features(extractor, dataset, cfg.batch_size, CPU, keep_masks=True, progress=False)
    warnings: list[str] = []
    for expected_cached in (0, len(samples)):  # extracted (and stored), then read back
        feats, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
        assert (count.cached, count.extracted) == (expected_cached, len(samples) - expected_cached)
        for name in ("patches", "router", "labels", "masks"):
            assert torch.equal(getattr(feats, name), getattr(plain, name)), name
        assert feats.patches.dtype == plain.patches.dtype and feats.masks.dtype == plain.masks.dtype
    assert plain.masks.any() and warnings == []


def test_background_writes_are_all_on_disk_after_flush(tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from moleflow.extractors import source as source_module
    monkeypatch.setattr(source_module, "pending_limit", lambda: 1)  # every write waited for but the newest
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    warnings: list[str] = []
    cache = FeatureCache(Path(cfg.feature_cache), {"test": 1}, 10**9, warn=warnings.append)
    background = FeatureSource(extractor, CPU, cfg.batch_size, workers=0, cache=cache, background=True)
    first, _ = background.features(build_dataset(cfg, samples), True, "test")
    background.flush()
    assert len(cache_entries(tmp_path / "cache")) == len(samples)
    again, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert count.cached == len(samples) and warnings == []
    assert torch.equal(again.patches, first.patches) and torch.equal(again.masks, first.masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_features_reach_the_gpu_through_the_staging_blocks_unchanged(tiny_data: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from moleflow.extractors import source as source_module
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    warnings: list[str] = []
    first, _ = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    _forget_one(tmp_path / "cache")                         # one image not in the cache: extracted on the GPU
    monkeypatch.setattr(source_module, "STAGING_BYTES", 2 * first.patches[0].numel() * 4)  # blocks of 2 rows
    cache = FeatureCache(Path(cfg.feature_cache), {"test": 1}, 10**9, warn=warnings.append)
    gpu = FeatureSource(extractor.to("cuda"), torch.device("cuda"), cfg.batch_size, workers=0, cache=cache)
    again, count = gpu.features(build_dataset(cfg, samples), True, "test")
    assert (count.cached, count.extracted) == (len(samples) - 1, 1) and warnings == []
    read = [i for i in range(len(samples)) if not torch.equal(again.patches[i].cpu(), first.patches[i])]
    assert len(read) <= 1 and torch.equal(again.masks, first.masks)  # every cached row bit-identical


def test_an_images_features_do_not_depend_on_the_images_beside_it(tiny_data: Path, tmp_path: Path) -> None:
    """Feature sets run the backbone on fixed chunks: any batch size, any subset, the same bits (so a
    partly filled cache, another seed's held-out pick or another --batch_size change nothing)."""
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    reference = extract_features(extractor, build_dataset(cfg, samples), 4, CPU, keep_masks=False, progress=False)
    for batch_size in (1, 3, 5):
        again = extract_features(extractor, build_dataset(cfg, samples), batch_size, CPU, keep_masks=False,
                                 progress=False)
        assert torch.equal(again.patches, reference.patches), batch_size
    odd = extract_features(extractor, build_dataset(cfg, samples[1::2]), 4, CPU, keep_masks=False, progress=False)
    assert torch.equal(odd.patches, reference.patches[1::2])


def test_stored_stage_maps_pool_to_the_same_features_whatever_their_neighbours(tiny_data: Path,
                                                                              tmp_path: Path) -> None:
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    images = torch.stack([build_dataset(cfg, samples)[i]["image"] for i in range(len(samples))])
    features = extractor.from_stored(extractor.stored(images))
    extractor.store_maps = True                             # what amp on a GPU does: the maps are kept
    rows = extractor.stored(images)
    (width,), dtype = extractor.stored_row(CPU)
    assert rows.shape == (len(samples), width) and rows.dtype == dtype
    pooled = extractor.from_stored(rows)
    torch.testing.assert_close(pooled, features, rtol=0, atol=1e-5)
    assert torch.equal(extractor(images), pooled)
    alone = torch.cat([extractor.from_stored(rows[i:i + 1]) for i in range(len(rows))])
    reversed_order = extractor.from_stored(rows.flip(0)).flip(0)
    assert torch.equal(alone, pooled) and torch.equal(reversed_order, pooled)


def test_a_cache_of_stage_maps_gives_the_features_of_the_plain_extraction(tiny_data: Path, tmp_path: Path) -> None:
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    extractor.store_maps = True
    plain = extract_features(extractor, build_dataset(cfg, samples), cfg.batch_size, CPU, keep_masks=True,
                             progress=False)
    warnings: list[str] = []
    for expected_cached in (0, len(samples)):  # maps extracted and stored, then read back and pooled
        feats, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
        assert (count.cached, count.extracted) == (expected_cached, len(samples) - expected_cached)
        assert torch.equal(feats.patches, plain.patches) and torch.equal(feats.masks, plain.masks)
    (width,), _ = extractor.stored_row(CPU)
    assert all(entry.size > 4 * width for entry in cache_entries(tmp_path / "cache")) and warnings == []
    _forget_one(tmp_path / "cache")                         # a block with one row missing
    feats, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert (count.cached, count.extracted) == (len(samples) - 1, 1)
    assert torch.equal(feats.patches, plain.patches) and torch.equal(feats.masks, plain.masks)
    extractor.store_maps = False                            # features expected, maps found: not used
    _, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert count.extracted == len(samples) and len(warnings) == len(samples) and "expected float32" in warnings[0]


def test_a_corrupt_entry_is_reported_and_extracted_again(tiny_data: Path, tmp_path: Path) -> None:
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    warnings: list[str] = []
    first, _ = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    entries = sorted(cache_entries(tmp_path / "cache"), key=lambda entry: entry.offset)
    segment = entries[0].path(tmp_path / "cache")
    assert all(entry.path(tmp_path / "cache") == segment for entry in entries)  # one writer: one segment
    data = bytearray(segment.read_bytes())
    data[entries[0].offset + entries[0].size - 5] ^= 0xFF   # a flipped byte at the end of the payload
    data[entries[1].offset:entries[1].offset + 19] = b"not an entry at all"
    data[entries[2].offset + entries[2].size // 2] ^= 0x01  # one flipped bit among the features
    del data[entries[-1].offset + 100:]                     # the segment cut short in its last entry
    segment.write_bytes(bytes(data))
    again, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert (count.cached, count.extracted) == (len(samples) - 4, 4)
    assert len(warnings) == 4 and all("is corrupt" in w and "extracted again" in w for w in warnings)
    assert torch.equal(again.patches, first.patches) and torch.equal(again.masks, first.masks)
    _, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert count.cached == len(samples) and len(warnings) == 4  # rewritten whole


def test_an_entry_whose_bytes_or_index_row_changed_is_not_read(tmp_path: Path) -> None:
    warnings: list[str] = []
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=warnings.append)
    features, mask = torch.randn(3, 3, 16), torch.randint(0, 2, (8, 8), dtype=torch.uint8)
    for n, place in enumerate((None, torch.zeros(8, 8, dtype=torch.uint8))):
        key = f"{n}" * 64                                   # the mask read into a given place, or on its own
        cache.write(key, features, mask)
        entry = cache.read(key, torch.empty(3, 3, 16), place)
        assert torch.equal(entry.patches, features) and torch.equal(entry.mask, mask)
        assert place is None or torch.equal(place, mask)
        (where,) = cache.locate([key])
        with open(where.path(tmp_path), "r+b") as segment:  # the mask's last byte changed
            segment.seek(where.offset + where.size - 1)
            segment.write(bytes([mask[-1, -1].item() ^ 1]))
        assert cache.read(key, torch.empty(3, 3, 16), place) is None and cache.locate([key]) == [None]
    assert len(warnings) == 2 and all("checksum mismatch" in w and "is corrupt" in w for w in warnings)
    cache.write("a" * 64, features, mask)
    cache.write("b" * 64, features, mask)
    (a_place,) = cache.locate(["a" * 64])
    cache.index.move([(cache.locate(["b" * 64])[0], a_place.segment, a_place.offset)])  # b's row names a's bytes
    assert cache.read("b" * 64, torch.empty(3, 3, 16)) is None and "key does not match" in warnings[-1]
    cache.write("e" * 64, features, None)                   # no mask, though a place is given
    place = torch.zeros(8, 8, dtype=torch.uint8)
    entry = cache.read("e" * 64, torch.empty(3, 3, 16), place)
    assert entry.mask is None and not place.any() and torch.equal(entry.patches, features) and len(warnings) == 3


def test_a_changed_file_is_not_read_from_the_cache(tiny_data: Path, tmp_path: Path) -> None:
    cfg, extractor, samples = _tiny(tmp_path, tiny_data)
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(tiny_data), str(copy)], check=True)
    samples = load_class_split("folder", copy, "fabric").test
    warnings: list[str] = []
    _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    image = samples[0].image_path
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))           # touched
    defect = next(s for s in samples if s.mask_path is not None)
    defect.mask_path.write_bytes(defect.mask_path.read_bytes() + b"\0")         # mask file grew
    _, count = _source(cfg, extractor, warnings).features(build_dataset(cfg, samples), True, "test")
    assert count.extracted == 2 and count.cached == len(samples) - 2 and warnings == []


WRITER = """
import sys, torch
from pathlib import Path
from moleflow.extractors.cache import FeatureCache
cache = FeatureCache(Path(sys.argv[1]), {"test": 1}, 10**9, warn=print)
me = int(sys.argv[2])
for i in range(40):
    cache.write(f"{me}{i:063d}", torch.full((8, 8, 32), float(me * 100 + i)), None)  # its own keys
    cache.write("f" * 64, torch.full((8, 8, 32), float(me)), None)                  # and one shared key
cache.trim()
"""


def test_runs_in_several_processes_share_one_cache(tmp_path: Path) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(me)], cwd=REPO, env=repo_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in range(1, 4)]
    outputs = [writer.communicate(timeout=300) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0] and outputs == [("", "")] * 3, outputs
    warnings: list[str] = []
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=warnings.append)
    for me in range(1, 4):
        for i in range(40):
            entry = cache.read(f"{me}{i:063d}", torch.empty(8, 8, 32))
            assert entry is not None and torch.equal(entry.patches, torch.full((8, 8, 32), float(me * 100 + i)))
    shared = cache.read("f" * 64, torch.empty(8, 8, 32)).patches
    assert float(shared[0, 0, 0]) in (1.0, 2.0, 3.0) and torch.equal(shared, torch.full_like(shared, shared[0, 0, 0]))
    assert len(cache_entries(tmp_path)) == 121 and warnings == []


def test_concurrent_writers_never_leave_a_partial_entry(tmp_path: Path) -> None:
    warnings: list[str] = []
    caches = [FeatureCache(tmp_path, {"test": 1}, 10**9, warn=warnings.append) for _ in range(4)]
    key = "ab" * 32
    values = [torch.full((4, 4, 64), float(i)) for i in range(4)]
    stop = threading.Event()
    seen: list[float] = []

    def write(i: int) -> None:
        for _ in range(50):
            caches[i].write(key, values[i], torch.ones(8, 8, dtype=torch.uint8))

    def read() -> None:
        while not stop.is_set():
            entry = caches[0].read(key, torch.empty(4, 4, 64))
            if entry is not None:
                seen.append(float(entry.patches[0, 0, 0]))
                assert torch.equal(entry.patches, values[int(seen[-1])]) and int(entry.mask.sum()) == 64

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert warnings == [] and seen
    files = sorted(p.suffix for p in (tmp_path / caches[0].fingerprint).rglob("*") if p.is_file())
    assert files == [".json", ".seg", ".seg", ".seg", ".seg"]  # a segment per writer, nothing else
    assert [entry.key for entry in cache_entries(tmp_path)] == [key]


def _segments(root: Path) -> list[Path]:
    return sorted(root.rglob("*.seg"))


def test_least_recently_used_entries_go_first_and_dead_bytes_are_rewritten_away(tmp_path: Path) -> None:
    other = FeatureCache(tmp_path, {"other": 1}, 10**9, warn=print)
    other.write("d" * 64, torch.zeros(4, 4, 8), None)       # another run's segment, still being written
    held = _segments(tmp_path)
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=print)
    for i, key in enumerate(("a" * 64, "b" * 64, "c" * 64)):
        cache.write(key, torch.full((4, 4, 8), float(i)), None)
        cache.index.touch([key], 1000.0 + i)
    assert cache.read("a" * 64, torch.empty(4, 4, 8)) is not None  # used now: the newest
    size = cache.locate(["a" * 64])[0].size
    cache.max_bytes = 3 * size                              # 4 entries: the oldest (b) goes
    assert cache.trim() == 3 * size
    assert sorted(entry.key[0] for entry in cache_entries(tmp_path)) == ["a", "c", "d"]
    assert set(held) < set(_segments(tmp_path)) and len(_segments(tmp_path)) == 2  # b's segment rewritten
    for key, value in (("a" * 64, 0.0), ("c" * 64, 2.0)):
        assert torch.equal(cache.read(key, torch.empty(4, 4, 8)).patches, torch.full((4, 4, 8), value))
    cache.max_bytes = 0
    assert cache.trim() == size and cache_entries(tmp_path) == []
    assert _segments(tmp_path) == held                      # only the held segment is left, though dead


def test_reads_take_adjacent_entries_of_one_segment_in_file_order_up_to_the_limits() -> None:
    def at(segment: str, offset: int, size: int = 100) -> tuple:
        return (offset, Location(f"{segment}{offset}", "f", segment, offset, size, 0, 0.0), None, None)

    grouped = runs([at("b", 0), at("a", 200), at("a", 0), at("a", 100), at("a", 400)])  # a gap at 300
    assert [[r[1].key for r in run] for run in grouped] == [["a0", "a100", "a200"], ["a400"], ["b0"]]
    many = runs([at("a", 100 * i) for i in range(RUN_ENTRIES + 1)])
    assert [len(run) for run in many] == [RUN_ENTRIES, 1]
    big = RUN_BYTES // 2
    assert [len(run) for run in runs([at("a", i * big, big) for i in range(5)])] == [2, 2, 1]


def _short(call, calls: list):
    """``os.preadv`` / ``os.pwritev`` that move at most 1,000 bytes a call, as a read or a full disk
    queue may; ``calls`` gets each call's offset."""
    def short(fd: int, views: list, offset: int) -> int:
        calls.append(offset)
        taken, budget = [], 1000
        for view in views:
            taken.append(memoryview(view)[:budget])
            budget -= len(taken[-1])
        return call(fd, [view for view in taken if len(view)], offset)
    return short


def test_vectored_reads_fill_every_view_across_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "preadv", _short(os.preadv, calls))
    data = os.urandom(3_000)
    (tmp_path / "file").write_bytes(data)
    first, second = bytearray(1_500), bytearray(1_200)
    fd = os.open(tmp_path / "file", os.O_RDONLY)
    try:
        assert read_fully(fd, [memoryview(first), memoryview(second)], 200) == 2_700
        assert read_fully(fd, [memoryview(bytearray(500))], 2_800) == 200  # the end of the file
    finally:
        os.close(fd)
    assert bytes(first) + bytes(second) == data[200:2_900] and calls[:3] == [200, 1_200, 2_200]


def test_vectored_writes_write_every_view_across_short_writes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", _short(os.pwritev, calls))
    parts = [os.urandom(2_500), b"", os.urandom(1_001)]
    segment = new_segment(tmp_path)
    try:
        write_fully(segment.fd, [memoryview(part) for part in parts], 10)
    finally:
        os.close(segment.fd)
    assert _segments(tmp_path)[0].read_bytes() == bytes(10) + b"".join(parts) and calls == [10, 1_010, 2_010, 3_010]


def test_a_read_refreshes_only_an_old_entrys_time(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=print)
    for key, age in (("a" * 64, 10.0), ("b" * 64, TOUCH_S + 10.0)):
        cache.write(key, torch.zeros(2, 2, 8), None)
        then = time.time() - age
        cache.index.touch([key], then)
        assert cache.read(key, torch.empty(2, 2, 8)) is not None
        assert (cache.locate([key])[0].used == then) == (age < TOUCH_S)


def test_keys_name_the_real_file_behind_links(tiny_data: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", {"test": 1}, 10**9, warn=print)
    real = load_class_split("folder", tiny_data, "fabric").test[0]
    (tmp_path / "linked").symlink_to(real.image_path.parent, target_is_directory=True)
    (tmp_path / "file.png").symlink_to(real.image_path)
    other = tmp_path / "other.png"
    shutil.copy2(real.image_path, other)  # same bytes, size and time, another file
    key = lambda path: cache.key(dataclasses.replace(real, image_path=path, mask_path=None), 64, "crop")
    assert key(real.image_path) == key(tmp_path / "linked" / real.image_path.name) == key(tmp_path / "file.png")
    assert key(other) != key(real.image_path)
    (tmp_path / "file.png").unlink()
    (tmp_path / "file.png").symlink_to(other)
    assert key(tmp_path / "file.png") == key(other)


def test_segments_left_by_a_killed_writer_are_removed_once_stale(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=print)
    cache.write("c" * 64, torch.randn(2, 2, 8), None)
    stale, fresh = cache.folder / "killed.seg", cache.folder / "starting.seg"
    stale.write_bytes(b"half an entry")                     # no index row names them, no writer holds them
    fresh.write_bytes(b"being written")
    os.utime(stale, (0, time.time() - STALE_S - 1))
    cache.trim()
    assert not stale.exists() and fresh.exists() and cache.read("c" * 64, torch.empty(2, 2, 8)) is not None


def test_an_older_versions_entry_files_are_removed_on_trim(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=print)
    old = cache.folder / "ab" / ("ab" * 32 + ".feat")         # format 2: a file per entry
    old.parent.mkdir()
    old.write_bytes(b"an old entry")
    cache.write("c" * 64, torch.randn(2, 2, 8), None)
    cache.trim()
    assert not old.parent.exists() and cache.read("c" * 64, torch.empty(2, 2, 8)) is not None


def test_a_damaged_index_is_reported_and_started_again(tmp_path: Path) -> None:
    warnings: list[str] = []
    FeatureCache(tmp_path, {"test": 1}, 10**9, warn=warnings.append).write("a" * 64, torch.zeros(2, 2, 8), None)
    for path in tmp_path.glob("index.sqlite*"):
        path.write_bytes(b"not a database" * 100)
    cache = FeatureCache(tmp_path, {"test": 1}, 10**9, warn=warnings.append)
    assert len(warnings) == 1 and "index.sqlite" in warnings[0] and "unreadable" in warnings[0]
    assert cache.read("a" * 64, torch.empty(2, 2, 8)) is None
    cache.write("a" * 64, torch.ones(2, 2, 8), None)
    assert torch.equal(cache.read("a" * 64, torch.empty(2, 2, 8)).patches, torch.ones(2, 2, 8))


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    flags = [*tiny_flags(tiny_data, tmp_path / "logs", classes=("fabric",), epochs=1),
             "--feature_cache", str(tmp_path / "file" / "cache")]
    done = subprocess.run([sys.executable, str(REPO / "run_moleflow.py"), *flags, "--quiet"], cwd=REPO,
                          capture_output=True, text=True, env=repo_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if "feature cache" in ln]
    assert len(lines) == 1 and str(tmp_path / "file" / "cache") in lines[0] and "--no_feature_cache" in lines[0]


def test_the_cache_command_reports_and_clears(cached_runs: dict) -> None:
    def cache_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moleflow.cache", *args], cwd=REPO, capture_output=True,
                              text=True, env=repo_env(), timeout=120)

    root = cached_runs["cache"]
    count = len(cache_entries(root))
    info = cache_cli("--info", str(root))
    assert info.returncode == 0 and f"{root}: {count} image(s)" in info.stdout
    assert "efficientnet_lite0" in info.stdout and "MB per image" in info.stdout
    cleared = cache_cli("--clear", str(root))
    assert cleared.returncode == 0 and "cleared" in cleared.stdout and cache_entries(root) == []
    missing = cache_cli("--info", str(root / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:")
    default = cache_cli("--info")
    assert default.returncode == 0 and os.environ["MOLEFLOW_CACHE_DIR"] in default.stdout


def test_augmented_features_are_never_stored(tiny_data: Path, tmp_path: Path) -> None:
    run = _run(tiny_data, tmp_path / "aug", "--feature_cache", str(tmp_path / "cache"), "--use_augmentation",
               "--num_epochs", "2", "--task_classes", "fabric")
    lines = [COUNT.search(line).groups() for line in (run / "training.log").read_text().splitlines()
             if COUNT.search(line)]
    train = [int(extracted) for what, _, extracted in lines if what.endswith("task 0 features")]
    assert len(train) == 2  # the plain features, then the second epoch's augmented ones
    others = sum(int(extracted) for what, _, extracted in lines if not what.endswith("task 0 features"))
    assert len(cache_entries(tmp_path / "cache")) == train[0] + others  # augmented images: not stored
