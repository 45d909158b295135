"""Data stage: source hashes, official sizes, leakage, shards, bad inputs, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.core.artifacts import atomic_dir

from components.config import DataParams, TaskSpec, load_params
from components.core.fingerprint import array_content_hash
from components.data.datasets import load_split, read_data_manifest
from components.data.loaders import load_source
from components.data.shards import partition
from components.data.splits import split_task
from components.stages.data import prepare_data
from components.core.errors import DataError

PROJECT = Path(__file__).parents[1]
SHARED = PROJECT.parent / "shared" / "data"
SHIPPED = ["pneumoniamnist", "breastmnist", "pubmedqa", "medical_abstracts"]
NPZ_KEYS = ["train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"]


def data_params(active: list[str], **fed: object) -> DataParams:
    base = load_params(PROJECT / "params").data
    return DataParams(tasks=base.tasks, active=active, federation=base.federation.model_copy(update=fed))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "data"
    return out, prepare_data(data_params(SHIPPED), PROJECT, out, seed=42)


def text_spec(path: Path, **kw: object) -> TaskSpec:
    fields: dict = dict(modality="text", format="table", path=str(path), kind="multiclass",
                        label_names=["a", "b", "c"], text_column="text", label_column="label",
                        split={"protocol": "stratified"})
    fields.update(kw)
    return TaskSpec(**fields)


# --------------------------------------------------------------------------- hashes and sizes
@pytest.mark.parametrize("name,digest", [
    ("breastmnist", "78cd2ba29895f8043733c00a8784c703fe1fd45b1d1a9b014d66f8e6ea30b7e7"),
    ("pneumoniamnist", "9334d20ce3df5d2655873c60d34709e00ba829952c6739d8edc917b7ca9348b2"),
])
def test_medmnist_content_hash(name: str, digest: str) -> None:
    with np.load(PROJECT / "data" / "medmnist" / f"{name}.npz") as npz:
        assert array_content_hash([npz[k] for k in NPZ_KEYS]) == digest


def test_official_sizes_and_manifest(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    assert read_data_manifest(out) == manifest
    sizes = {t: {s: v["n"] for s, v in e["splits"].items()} for t, e in manifest["tasks"].items()}
    assert sizes["breastmnist"] == {"train": 546, "val": 78, "test": 156}
    assert sizes["pneumoniamnist"] == {"train": 4708, "val": 524, "test": 624}
    assert sizes["pubmedqa"]["test"] == 500 and sizes["pubmedqa"]["train"] + sizes["pubmedqa"]["val"] == 500
    counts = manifest["tasks"]["breastmnist"]["splits"]["test"]["class_counts"]
    assert counts == {"malignant": 42, "normal_or_benign": 114}
    x = load_split(out, "breastmnist", "train")
    assert x.inputs.shape == (546, 28, 28) and x.inputs.dtype == np.uint8 and x.labels.dtype == np.int64
    t = load_split(out, "pubmedqa", "test")
    assert len(t.inputs) == 500 and isinstance(t.inputs[0], str) and t.num_labels == 3


def test_text_splits_disjoint_and_stratified(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    for task in ("medical_abstracts", "pubmedqa"):
        parts = {s: load_split(out, task, s) for s in ("train", "val", "test")}
        texts = {s: {t.strip() for t in d.inputs} for s, d in parts.items()}
        assert not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
        assert not texts["train"] & texts["val"]
    entry = manifest["tasks"]["medical_abstracts"]
    n = {s: entry["splits"][s]["n"] for s in ("train", "val", "test")}
    total = sum(n.values())
    assert total + entry["removed_duplicates"] == 2888
    for s, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        shares = np.array(list(entry["splits"][s]["class_counts"].values())) / n[s]
        overall = sum(np.array(list(entry["splits"][k]["class_counts"].values())) for k in n) / total
        assert abs(n[s] / total - frac) < 0.01
        assert np.abs(shares - overall).max() < 0.02


def test_shards_cover_train_once_and_dirichlet_skews(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    labels = load_split(out, "medical_abstracts", "train").labels
    shards = json.loads((out / "medical_abstracts" / "shards.json").read_text())
    assert shards["mode"] == "dirichlet" and len(shards["clients"]) == 4

    def skew(clients: list[np.ndarray]) -> float:
        overall = np.bincount(labels, minlength=5) / len(labels)
        return float(np.mean([np.abs(np.bincount(labels[c], minlength=5) / len(c) - overall).sum() for c in clients]))

    skews = {}
    for mode in ("iid", "dirichlet"):
        clients = partition(labels, 4, mode, 0.5, seed=0)
        assert all(len(c) > 0 for c in clients)
        assert np.array_equal(np.sort(np.concatenate(clients)), np.arange(len(labels)))
        skews[mode] = skew(clients)
    assert skews["dirichlet"] > 3 * skews["iid"]
    stored = [np.asarray(c) for c in shards["clients"]]
    assert np.array_equal(np.sort(np.concatenate(stored)), np.arange(len(labels)))


@pytest.mark.skipif(not (SHARED / "text" / "symptom2disease").is_dir(), reason="shared data absent")
def test_symptom2disease_dedup() -> None:
    params = data_params(["symptom2disease"])
    spec = params.tasks["symptom2disease"]
    splits, stats = split_task("symptom2disease", spec, load_source("symptom2disease", spec, PROJECT), seed=1)
    assert stats["removed_duplicates"] == 47
    texts = [t.strip() for p in splits.values() for t in p.inputs]
    assert len(texts) == len(set(texts)) == 1200 - 47


# --------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"task t: source .*nope\.csv not found"):
        load_source("t", text_spec(tmp_path / "nope.csv"), PROJECT)
    with pytest.raises(DataError, match="optional task t: .*MEDEXPERTS_SHARED_DATA"):
        load_source("t", text_spec(tmp_path / "nope.csv", optional=True), PROJECT)


def test_malformed_row_missing_label(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("text,label\nhello,a\nworld\n")
    with pytest.raises(DataError, match=r"task t: .*t\.csv row 2: missing label"):
        load_source("t", text_spec(f), PROJECT)


def test_label_not_in_label_values(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("text,label\nhello,1\nworld,7\n")
    with pytest.raises(DataError, match=r"row 2: label '7' not in label_values"):
        load_source("t", text_spec(f, label_values=["1", "2", "3"]), PROJECT)


def test_wrong_image_shape(tmp_path: Path) -> None:
    f = tmp_path / "bad.npz"
    img, lab = np.zeros((4, 28), np.uint8), np.zeros((4, 1), np.uint8)
    np.savez(f, **{k: (img if k.endswith("images") else lab) for k in NPZ_KEYS})
    spec = TaskSpec(modality="image", format="medmnist_npz", path=str(f), kind="binary",
                    label_names=["a", "b"], split={"protocol": "official"})
    with pytest.raises(DataError, match=r"task img: .*bad\.npz: train_images has shape \(4, 28\)"):
        load_source("img", spec, PROJECT)


def test_tampered_split_and_unknown_task(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_data(data_params(["breastmnist"]), PROJECT, out, seed=0)
    with pytest.raises(DataError, match=r"unknown task 'nope'.*known: \['breastmnist'\]"):
        load_split(out, "nope", "train")
    with np.load(out / "breastmnist" / "val.npz") as npz:
        x, y = npz["x"].copy(), npz["y"]
    x[0, 0, 0] ^= 1
    np.savez(out / "breastmnist" / "val.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"breastmnist: .*val\.npz hash mismatch.*re-run the data stage"):
        load_split(out, "breastmnist", "val")


def test_failed_prepare_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_data(data_params(["breastmnist"]), PROJECT, out, seed=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    params = data_params(["breastmnist"])
    params.tasks["broken"] = text_spec(tmp_path / "missing.csv")
    params.active = ["breastmnist", "broken"]
    with pytest.raises(DataError, match="task broken: source"), atomic_dir(out) as tmp:
        prepare_data(params, PROJECT, tmp, seed=0)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folder left behind


def test_subset_seeded_and_stratified(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    full = load_split(out, "pneumoniamnist", "train")
    a, b = full.subset(300, seed=3), full.subset(300, seed=3)
    assert len(a) == 300 and np.array_equal(a.inputs, b.inputs) and full.subset(None, 0) is full
    assert abs(a.labels.mean() - full.labels.mean()) < 0.01


def test_prepare_is_deterministic(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    _, manifest = prepared
    again = prepare_data(data_params(["medical_abstracts"]), PROJECT, tmp_path / "d", seed=42)
    assert again["tasks"]["medical_abstracts"] == manifest["tasks"]["medical_abstracts"]
