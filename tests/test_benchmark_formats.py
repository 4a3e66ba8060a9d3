"""The benchmark formats reader shared by decontamination and the benchmark harness: a
benchmark JSON is input too, and may not name files outside its dataset folder."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from pipelines.sources import benchmarks as fmt
from pipelines.stages.decontam import list_images
from trainer.bench.datasets import load_counting, load_retrieval, load_selo


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "bench" / "rsicd"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "images" / "a.jpg")
    secret = tmp_path / "secret.jpg"  # outside the dataset folder
    Image.new("RGB", (32, 32), (200, 0, 0)).save(secret)
    return root, secret


def _karpathy(root, filename, filepath=None):
    im = {"filename": filename, "split": "test", "sentences": [{"raw": "a farm"}]}
    if filepath is not None:
        im["filepath"] = filepath
    doc = {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]}, im]}
    (root / "dataset_rsicd.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("filename, filepath", [
    ("../../secret.jpg", None),
    ("/etc/passwd", None),
    ("secret.jpg", "../.."),
    ("C:\\Windows\\win.ini", None),
])
def test_caption_json_paths_stay_inside_the_dataset(dataset, filename, filepath):
    root, _ = dataset
    _karpathy(root, filename, filepath)
    with pytest.raises(fmt.BenchmarkFormatError, match="absolute|leaves"):
        load_retrieval(root, "rsicd")
    with pytest.raises(fmt.BenchmarkFormatError, match="absolute|leaves"):
        list_images(str(root))  # decontamination reads the same file the same way


def test_a_symlink_out_of_the_dataset_is_refused(dataset):
    root, secret = dataset
    os.symlink(secret, root / "images" / "link.jpg")
    _karpathy(root, "link.jpg")
    with pytest.raises(fmt.BenchmarkFormatError, match="symlink"):
        load_retrieval(root, "rsicd")


def test_counting_and_selo_entries_are_checked_too(dataset):
    root, _ = dataset
    (root / "count.json").write_text(json.dumps(
        [{"filename": "../../secret.jpg", "category": "car", "count": 2, "caption": "2 cars"}]))
    with pytest.raises(fmt.BenchmarkFormatError, match="leaves"):
        load_counting(root / "count.json", "c")
    (root / "selo.json").write_text(json.dumps(
        [{"image": "/etc/hosts", "query": "a farm", "regions": [[[0, 0], [1, 1], [0, 1]]]}]))
    with pytest.raises(fmt.BenchmarkFormatError, match="absolute"):
        load_selo(root / "selo.json", "s")


def test_split_files_are_checked(tmp_path):
    root = tmp_path / "aid"
    (root / "farm").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "farm" / "f.jpg")
    (root / "split.json").write_text(json.dumps({"train": ["farm/f.jpg"],
                                                 "test": ["../../etc/passwd"]}))
    with pytest.raises(fmt.BenchmarkFormatError, match="leaves"):
        fmt.class_folder_images(str(root), "split.json")


def test_good_entries_still_load(dataset):
    root, _ = dataset
    _karpathy(root, "a.jpg")
    data = load_retrieval(root, "rsicd")
    assert [p.name for p in data.paths] == ["a.jpg", "a.jpg"]
    assert [rel for rel, _ in list_images(str(root))] == ["a.jpg"]


def test_a_caption_json_s_splits_can_be_chosen_for_decontamination(tmp_path):
    root = tmp_path / "rsicd"
    (root / "images").mkdir(parents=True)
    items = []
    for i, split in enumerate(("train", "test", "val", "train")):
        Image.new("RGB", (32, 32), (i * 40, 10, 10)).save(root / "images" / f"{i}.jpg")
        items.append({"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": "x"}]})
    path = root / "dataset_rsicd.json"
    path.write_text(json.dumps({"images": items}))
    assert [n for n, _ in fmt.benchmark_images(str(path))] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert [n for n, _ in fmt.benchmark_images(f"{path}@test")] == ["1.jpg"]
    assert [n for n, _ in list_images(f"{path}@test@val")] == ["1.jpg", "2.jpg"]
    assert fmt.split_suffix(f"{path}::{root / 'images'}@test") == (
        f"{path}::{root / 'images'}", ("test",))
