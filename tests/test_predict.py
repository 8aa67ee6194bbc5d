"""`cifar-predict`: picture files of any size and mode in, top-k class names out, as evaluation
scores them; bad files named one per line without stopping the rest. (The check against the
evaluate stage's own predictions, and MLflow model URIs, are in test_workflows.py.)"""

from __future__ import annotations

import csv
import subprocess
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.core.model import FlipTTA, build_model
from cifar_alexnet.core.train import predict
from cifar_alexnet.core.transforms import fit_to_input
from cifar_alexnet.predict import read_image
from cifar_alexnet.stages.artifacts import save_trained_model
from helpers import run, tiny_params, write_params

NAMES = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def test_images(archive) -> np.ndarray:
    return read_archive(archive.path).test.images[:6]


def save_png(path, chw: np.ndarray, mode: str = "RGB") -> None:
    Image.fromarray(np.transpose(chw, (1, 2, 0))).convert(mode).save(path)


def test_a_32_pixel_image_is_the_input_unchanged_and_others_are_fitted(test_images):
    image = torch.from_numpy(test_images[0])
    assert torch.equal(fit_to_input(image), image)
    wide = torch.full((3, 48, 96), 200, dtype=torch.uint8)
    fitted = fit_to_input(wide)
    assert fitted.shape == (3, 32, 32) and fitted.dtype == torch.uint8
    assert torch.all(fitted == 200)  # a flat colour stays exactly that colour
    # CIFAR-10 is photographs scaled down: a smooth picture at twice the size scales back to
    # (nearly) itself, and a portrait loses its top and bottom, not its shape
    ramp = torch.arange(32).float()
    rows, cols = ramp[:, None].expand(32, 32), ramp[None, :].expand(32, 32)
    smooth = torch.stack([rows * 4 + cols * 3, rows * 7,
                          cols * 7]).to(torch.uint8)
    doubled = smooth.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert (fit_to_input(doubled).int() - smooth.int()).abs().max() <= 4
    portrait = torch.zeros(3, 64, 32, dtype=torch.uint8)
    portrait[:, 16:48] = smooth
    assert torch.equal(fit_to_input(portrait), smooth)  # the centre square, untouched


def test_files_of_every_mode_decode_to_rgb_inputs(test_images, tmp_path):
    image = test_images[1]
    save_png(tmp_path / "rgb.png", image)
    assert np.array_equal(read_image(tmp_path / "rgb.png").numpy(), image)  # lossless
    save_png(tmp_path / "gray.png", image, "L")
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[1])
    save_png(tmp_path / "alpha.png", image, "RGBA")
    assert np.array_equal(read_image(tmp_path / "alpha.png").numpy(), image)  # alpha dropped
    save_png(tmp_path / "palette.gif", image, "P")
    assert read_image(tmp_path / "palette.gif").shape == (3, 32, 32)
    save_png(tmp_path / "photo.bmp", image)
    assert np.array_equal(read_image(tmp_path / "photo.bmp").numpy(), image)
    ramp = np.linspace(0, 255, 32)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, np.ones(32)),
                       np.outer(np.ones(32), ramp)]).astype(np.uint8)
    Image.fromarray(np.transpose(smooth, (1, 2, 0))).save(tmp_path / "photo.jpg", quality=95)
    jpeg = read_image(tmp_path / "photo.jpg").int()
    assert (jpeg - torch.from_numpy(smooth).int()).abs().float().mean() < 3  # lossy, but close
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(tmp_path / "notes.txt")


@pytest.fixture(scope="module")
def model_project(archive, tmp_path_factory):
    """A directory with params.yaml (flip TTA on) and a models/ as the train stage writes it."""
    root = tmp_path_factory.mktemp("predict")
    write_params(root / "params.yaml", tiny_params(archive))
    torch.manual_seed(0)
    model = build_model(ModelConfig("alexnet", 0.0625, 0.0, "batch"))
    (root / "models").mkdir()
    save_trained_model(root / "models", model, NAMES, 1, 0.5, "no-run")
    return root, model.eval()


def cifar_predict(*args: str, cwd) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cifar_alexnet.predict", *args], cwd=cwd)


def test_predicts_what_the_model_with_flip_tta_gives_in_every_format(model_project, test_images):
    root, model = model_project
    pictures = root / "pictures"
    (pictures / "nested").mkdir(parents=True)
    for i, image in enumerate(test_images[:4]):
        save_png(pictures / ("nested" if i % 2 else ".") / f"{i}.png", image)
    expected = torch.softmax(predict(FlipTTA(model), torch.from_numpy(test_images[:4]), 8), 1)

    result = cifar_predict("pictures", "--format", "json", "--top-k", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [f"pictures/{n}" for n in
                                         ("0.png", "2.png", "nested/1.png", "nested/3.png")]
    for row in rows:
        probabilities = expected[int(row["file"][-5])]
        top = probabilities.topk(2)
        assert [p["class"] for p in row["predictions"]] == [NAMES[i] for i in top.indices]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(
            top.values.tolist(), abs=1e-5)

    as_csv = list(csv.DictReader(io.StringIO(cifar_predict(
        "pictures/0.png", "--format", "csv", cwd=root).stdout)))
    assert [r["rank"] for r in as_csv] == ["1", "2", "3"]
    assert as_csv[0]["class"] == rows[0]["predictions"][0]["class"]

    table = cifar_predict("pictures/0.png", "--top-k", "1", cwd=root).stdout.splitlines()
    assert table[0].split() == ["file", "top-1"]
    assert table[1].split()[:2] == ["pictures/0.png", rows[0]["predictions"][0]["class"]]


def test_without_tta_the_plain_model_answers(model_project, test_images):
    root, model = model_project
    save_png(root / "one.png", test_images[0])
    result = cifar_predict("one.png", "--format", "json", "--set", "evaluate.flip_tta=false",
                           cwd=root)
    plain = torch.softmax(predict(model, torch.from_numpy(test_images[:1]), 8), 1)[0]
    assert json.loads(result.stdout)[0]["predictions"][0]["probability"] == pytest.approx(
        plain.max().item(), abs=1e-5)


def test_bad_files_get_one_line_each_and_the_rest_are_still_classified(model_project,
                                                                        test_images):
    root, _ = model_project
    save_png(root / "good.png", test_images[2])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "empty.jpg").write_bytes(b"")
    (root / "no-pictures").mkdir()
    result = cifar_predict("good.png", "broken.png", "empty.jpg", "missing.png", "no-pictures",
                           cwd=root)
    assert result.returncode == 1
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["file", "good.png"]
    errors = result.stderr.splitlines()
    errors = [line for line in errors if line.startswith("error: ")]
    assert len(errors) == 4, result.stderr
    for name, reason in [("broken.png", "cannot be read as an image"),
                         ("empty.jpg", "cannot be read as an image"),
                         ("missing.png", "no such file"), ("no-pictures", "no image files")]:
        assert any(line.startswith(f"error: {name}: ") and reason in line for line in errors), name
    assert "Traceback" not in result.stderr


def test_no_model_says_how_to_get_one(tmp_path, test_images):
    save_png(tmp_path / "a.png", test_images[0])
    result = cifar_predict("a.png", cwd=tmp_path)
    assert result.returncode == 1
    assert "models/model.pt not found" in result.stderr and "dvc repro" in result.stderr
