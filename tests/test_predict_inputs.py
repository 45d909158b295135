"""`medexperts predict` with bad inputs: one line naming what the model takes, exit 2; never a traceback, never
silent nonsense (an image array read as text, a 64x64 or RGB image given to a 28x28 grayscale model)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from components.bundle.format import TaskHead, check_image_input, image_input, save_bundle
from components.core.errors import DataError
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation
from components.tracking.pyfunc import to_raw
from flows.cli import app


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture()
def image_model(isolated_project: Path) -> str:
    """A registered 28x28 grayscale image model (as the experts stage writes one: the input recorded)."""
    from components.tracking.registry import register_bundle

    torch.manual_seed(0)
    enc = ImageEncoder([4]).eval()
    found = Foundation("image", enc, "a" * 64, {"config": enc.config})
    spec = image_input(np.zeros((2, 28, 28), np.uint8))
    save_bundle(isolated_project / "bundle", found, {},
                {"t": TaskHead(make_head(4, 2), "binary", ["no", "yes"], spec)}, "t", {})
    with mlflow.start_run():
        version = register_bundle("img", isolated_project / "bundle", 0.7, {})
    return f"models:/img/{version}"


def one_error_line(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "Traceback" not in output, output
    text = " ".join(lines)  # rich wraps long lines at the console width
    for needle in needles:
        assert needle in text, output


@pytest.mark.parametrize(("name", "shape", "needles"), [
    ("ok.npy", (3, 28, 28), ()),
    ("big.npy", (3, 64, 64), ("takes 28x28 grayscale", "got 64x64", "resize")),
    ("rgb.npy", (3, 28, 28, 3), ("takes 28x28 grayscale", "got 3 channel")),
])
def test_images_of_another_size_or_channels_are_refused(image_model: str, tmp_path: Path, name: str,
                                                          shape: tuple[int, ...], needles: tuple[str, ...]) -> None:
    np.save(tmp_path / name, np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8))
    code, output = invoke("predict", "--model", image_model, "--input", str(tmp_path / name))
    if not needles:
        assert code == 0 and ("yes" in output or "no" in output), output
    else:
        one_error_line(code, output, *needles)


def test_text_to_an_image_model_and_a_bad_task(image_model: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("chest pain\n")
    one_error_line(*invoke("predict", "--model", image_model, "--input", str(tmp_path / "notes.txt")),
                   "uint8 images", "got text")
    np.save(tmp_path / "ok.npy", np.zeros((1, 28, 28), np.uint8))
    one_error_line(*invoke("predict", "--model", image_model, "--input", str(tmp_path / "ok.npy"), "--task", "x"),
                   "--task 'x'", "['t']")


@pytest.mark.parametrize("name", ["bad.npy", "bad.npz", "latin1.txt"])
def test_unreadable_input_files(isolated_project: Path, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "bad.npy":
        path.write_bytes(b"\x93NUMPY\x01\x00garbage")  # a header cut short
    elif name == "bad.npz":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        path.write_bytes("fièvre\n".encode("latin-1"))
    one_error_line(*invoke("predict", "--model", "models:/whatever@champion", "--input", str(path)),
                   str(path), "expected")


def test_an_image_array_is_not_read_as_text() -> None:
    with pytest.raises(DataError, match="takes text"):
        to_raw(np.zeros((2, 28, 28), np.uint8), "text")
    assert to_raw(np.array(["a", "b"]), "text") == ["a", "b"]


def test_check_image_input_accepts_only_the_trained_layout() -> None:
    spec = {"height": 28, "width": 28, "channels": 3}
    check_image_input(np.zeros((1, 28, 28, 3), np.uint8), spec, "t")
    with pytest.raises(DataError, match="got 1 channel"):
        check_image_input(np.zeros((1, 28, 28), np.uint8), spec, "t")
    with pytest.raises(DataError, match="float32"):
        check_image_input(np.zeros((1, 28, 28, 3), np.float32), spec, "t")
    check_image_input(np.zeros((1, 64, 64), np.uint8), None, "t")  # an old bundle without the record: no check


def test_a_registered_model_changed_in_the_store_is_refused(image_model: str, tmp_path: Path) -> None:
    """A line appended to the registered model's entry file (code that runs at load) must not run: predict
    refuses the version, in one line."""
    from urllib.parse import urlparse

    client = mlflow.MlflowClient()
    name, version = image_model.removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    assert mv.tags["files.sha256"]
    store = Path(urlparse(client.get_model_version_download_uri(name, version)).path)
    entry = next(store.rglob("pyfunc_entry.py"))
    np.save(tmp_path / "ok.npy", np.zeros((1, 28, 28), np.uint8))
    marker = tmp_path / "ran"
    entry.write_text(entry.read_text() + f"\nopen({str(marker)!r}, 'w').write('x')\n")
    one_error_line(*invoke("predict", "--model", image_model, "--input", str(tmp_path / "ok.npy")),
                   "differ from what was registered")
    assert not marker.exists()


def test_a_version_without_a_digest_is_loaded_only_when_asked(image_model: str, tmp_path: Path) -> None:
    """A version registered before digests were recorded cannot be checked: refused in one line naming the
    fix, loaded with --allow-unverified."""
    client = mlflow.MlflowClient()
    name, version = image_model.removeprefix("models:/").split("/")
    client.delete_model_version_tag(name, version, "files.sha256")
    np.save(tmp_path / "ok.npy", np.zeros((1, 28, 28), np.uint8))
    one_error_line(*invoke("predict", "--model", image_model, "--input", str(tmp_path / "ok.npy")),
                   "without a file digest", "--allow-unverified")
    code, output = invoke("predict", "--model", image_model, "--input", str(tmp_path / "ok.npy"), "--allow-unverified")
    assert code == 0, output


def test_a_bundle_modified_after_its_stage_is_not_registered(isolated_project: Path) -> None:
    from components.core.errors import ArtifactError
    from components.tracking.registry import register_bundle

    torch.manual_seed(0)
    enc = ImageEncoder([4]).eval()
    found = Foundation("image", enc, "a" * 64, {"config": enc.config})
    bundle = isolated_project / "bundle"
    save_bundle(bundle, found, {}, {"t": TaskHead(make_head(4, 2), "binary", ["no", "yes"])}, "t", {})
    heads = bundle / "heads.safetensors"
    raw = bytearray(heads.read_bytes())
    raw[-1] ^= 0xFF
    heads.write_bytes(bytes(raw))
    with mlflow.start_run(), pytest.raises(ArtifactError, match="sha256 does not match"):
        register_bundle("tampered", bundle, 0.7, {})
    assert not mlflow.MlflowClient().search_registered_models("name='tampered'")
