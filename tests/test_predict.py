"""`cifar-predict`: picture files of any size and mode in, top-k class names out, as evaluation
scores them, printed a batch at a time; bad and hostile files named one per line without
stopping the rest, in bounded memory. (The check against the evaluate stage's own predictions,
and MLflow model URIs, are in test_experiments.py.)"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.core.model import FlipTTA, build_model
from cifar_alexnet.core.trainer import batched_logits
from cifar_alexnet.core.transforms import fit_to_input
from cifar_alexnet.errors import DataError
from cifar_alexnet.pictures import PictureError
from cifar_alexnet.cifar_predict import read_image
from cifar_alexnet.stages.artifacts import load_trained_model, save_trained_model
from helpers import run, subprocess_env, tiny_params, write_params

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
    with pytest.raises(ValueError, match="cannot be read as an image"):
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
    return run([sys.executable, "-m", "cifar_alexnet.cifar_predict", *args], cwd=cwd)


def test_predicts_what_the_model_with_flip_tta_gives_in_every_format(model_project, test_images):
    root, model = model_project
    pictures = root / "pictures"
    (pictures / "nested").mkdir(parents=True)
    for i, image in enumerate(test_images[:4]):
        save_png(pictures / ("nested" if i % 2 else ".") / f"{i}.png", image)
    expected = torch.softmax(batched_logits(FlipTTA(model), torch.from_numpy(test_images[:4]), 8), 1)

    # --batch-size 3: the four pictures are two batches, each printed when it is scored, and
    # every format is still one document: one JSON array, one CSV header, one table header
    result = cifar_predict("pictures", "--format", "json", "--top-k", "2", "--batch-size", "3",
                           cwd=root)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert result.stdout == json.dumps(rows, indent=2) + "\n"  # the layout it always had
    assert [r["file"] for r in rows] == [f"pictures/{n}" for n in
                                         ("0.png", "2.png", "nested/1.png", "nested/3.png")]
    for row in rows:
        probabilities = expected[int(row["file"][-5])]
        top = probabilities.topk(2)
        assert [p["class"] for p in row["predictions"]] == [NAMES[i] for i in top.indices]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx(
            top.values.tolist(), abs=1e-5)

    as_csv = cifar_predict("pictures", "--format", "csv", "--top-k", "2", "--batch-size", "3",
                           cwd=root).stdout
    assert list(csv.reader(io.StringIO(as_csv))) == [["file", "rank", "class", "probability"]] + [
        [row["file"], str(rank), p["class"], f"{p['probability']:.6f}"]
        for row in rows for rank, p in enumerate(row["predictions"], 1)]

    table = cifar_predict("pictures", "--top-k", "1", "--batch-size", "3",
                          cwd=root).stdout.splitlines()
    cells = [line.split() for line in table]
    assert [c[:2] for c in cells] == [["file", "top-1"]] + [
        [row["file"], row["predictions"][0]["class"]] for row in rows]
    assert len({line.index(c[1]) for line, c in zip(table, cells)}) == 1  # one column width


def test_without_tta_the_plain_model_answers(model_project, test_images):
    root, model = model_project
    save_png(root / "one.png", test_images[0])
    result = cifar_predict("one.png", "--format", "json", "--set", "evaluate.flip_tta=false",
                           cwd=root)
    plain = torch.softmax(batched_logits(model, torch.from_numpy(test_images[:1]), 8), 1)[0]
    assert json.loads(result.stdout)[0]["predictions"][0]["probability"] == pytest.approx(
        plain.max().item(), abs=1e-5)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_flat_png(path: Path, width: int, height: int, rgb: tuple[int, int, int] | None) -> None:
    """An RGB PNG of one colour, written row by row (Pillow would first hold all of it in
    memory, and take seconds to compress it): with PNG's "up" filter every row after the first
    is zeros, which deflate packs to nearly nothing. ``rgb=None``: no pixel data, only a header
    that claims the size (the size check refuses it before the pixels are read)."""
    stream = zlib.compressobj(1)
    data = b""
    if rgb is not None:
        data = stream.compress(b"\x01" + bytes(rgb) + bytes(3 * (width - 1)))  # "sub" filter
        up = b"\x02" + bytes(3 * width)
        data += b"".join(stream.compress(up) for _ in range(height - 1))
    data += stream.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid 8 x 8 JPEG whose frame header claims another size (as the tester's 693 bytes
    claiming 65000 x 65000 did)."""
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(small, "JPEG")
    data = bytearray(small.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def run_measured(args: list[str], cwd: Path, timeout: float = 180) -> tuple[
        subprocess.CompletedProcess, int]:
    """cifar-predict's result and its peak resident memory in bytes: wait4 reports that child's
    own (RUSAGE_CHILDREN would be the largest of every child this test process has had)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-m", "cifar_alexnet.cifar_predict", *args], cwd=cwd,
                                 env=subprocess_env(), stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while not (waited := os.wait4(child.pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                child.kill()
                os.wait4(child.pid, 0)
                child.returncode = -9
                pytest.fail(f"cifar-predict {args} still running after {timeout} s")
            time.sleep(0.05)
        _, status, usage = waited
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (subprocess.CompletedProcess(child.args, child.returncode, out.read().decode(),
                                            err.read().decode()), usage.ru_maxrss * 1024)


def test_bad_and_hostile_files_get_one_line_each_and_the_rest_are_classified_in_bounded_memory(
        model_project, test_images):
    root, _ = model_project
    save_png(root / "good.png", test_images[2])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "empty.jpg").write_bytes(b"")
    (root / "no-pictures").mkdir()
    # What the tester found: headers claiming huge sizes, a 1000000 x 1 strip (the resize asked
    # for 12 GB), a 12000 x 12000 picture (3.6 GB, 41 s), a FIFO (blocked forever), /dev/zero.
    (root / "huge.jpg").write_bytes(jpeg_claiming(65000, 65000))
    write_flat_png(root / "huge.png", 30000, 30000, None)
    Image.new("L", (1_000_000, 1), 128).save(root / "strip.png")
    write_flat_png(root / "big.png", 12000, 12000, (200, 30, 90))  # 144 Mpx, under the cap
    Image.new("RGB", (32, 32), (200, 30, 90)).save(root / "small.png")  # what big.png shows
    os.mkfifo(root / "fifo")
    limit = 2 * Image.MAX_IMAGE_PIXELS

    result, peak = run_measured(["good.png", "broken.png", "empty.jpg", "missing.png",
                                 "no-pictures", "huge.jpg", "huge.png", "strip.png", "big.png",
                                 "fifo", "/dev/zero", "small.png", "--format", "csv"], cwd=root)
    assert result.returncode == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["file"] for r in rows if r["rank"] == "1"] == ["good.png", "big.png", "small.png"]
    # a flat colour shrinks to exactly that colour: the big picture is classified as it looks
    assert [(r["class"], r["probability"]) for r in rows if r["file"] == "big.png"] == [
        (r["class"], r["probability"]) for r in rows if r["file"] == "small.png"]
    assert peak < 2 * 2**30, f"peak resident memory {peak / 2**30:.2f} GiB"

    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 9, result.stderr
    for name, *reasons in [
            ("broken.png", "cannot be read as an image"),
            ("empty.jpg", "cannot be read as an image"),
            ("missing.png", "no such file"), ("no-pictures", "no image files"),
            ("huge.jpg", "4,225,000,000 pixels", f"limit of {limit:,}"),
            ("huge.png", "900,000,000 pixels", f"limit of {limit:,}"),
            ("strip.png", "1000000 x 1 pixels", "20:1", "square"),
            ("fifo", "not a regular file", "named pipe"),
            ("/dev/zero", "not a regular file", "character device")]:
        line = next((line for line in errors if line.startswith(f"error: {name}: ")), "")
        assert all(reason in line for reason in reasons), (name, result.stderr)
    broken = next(line for line in errors if line.startswith("error: broken.png: "))
    assert broken.count("image") == 1, broken  # said once, not nested in itself
    assert "Traceback" not in result.stderr and "DecompressionBomb" not in result.stderr
    assert "classifying" not in result.stderr  # no progress bar when stderr is not a terminal


def test_no_model_says_how_to_get_one(tmp_path, test_images):
    save_png(tmp_path / "a.png", test_images[0])
    result = cifar_predict("a.png", cwd=tmp_path)
    assert result.returncode == 1
    assert "models/model.pt not found" in result.stderr and "dvc repro" in result.stderr


def test_pictures_decode_upright_and_16_bit_and_float_ones_as_they_look(test_images, tmp_path):
    image = test_images[3]
    # a phone photo: stored sideways, with the EXIF orientation that tells a viewer to turn it
    sideways = np.concatenate([image, image[:, :, :16]], axis=2)  # 48 wide, 32 tall
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(np.transpose(sideways, (1, 2, 0))).save(tmp_path / "phone.png", exif=exif)
    upright = np.rot90(sideways, k=-1, axes=(1, 2)).copy()  # clockwise: 32 wide, 48 tall
    assert torch.equal(read_image(tmp_path / "phone.png"), fit_to_input(torch.from_numpy(upright)))

    gray = image[0]
    Image.fromarray(gray).save(tmp_path / "8-bit.png")
    seen = read_image(tmp_path / "8-bit.png").int()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16-bit.png")  # 255 -> 65535
    Image.fromarray(gray.astype(np.int32) * 257).save(tmp_path / "32-bit-int.tiff")
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tiff")  # in [0, 1]
    for name in ("16-bit.png", "32-bit-int.tiff", "float.tiff"):
        assert (read_image(tmp_path / name).int() - seen).abs().max() <= 1, name
    # floats outside [0, 1] (here -0.5 .. 2.05) have no reading as a picture: refused, not guessed
    Image.fromarray(gray.astype(np.float32) / 100 - 0.5).save(tmp_path / "raw.tiff")
    with pytest.raises(PictureError, match=r"float pixel values outside \[0, 1\]"):
        read_image(tmp_path / "raw.tiff")


def peak_rss_growth(action) -> int:
    """Bytes by which this process's peak resident memory grows while ``action()`` runs (Linux:
    clear_refs resets the peak to the current size)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak resident memory")

    def kib(field: str) -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith(field)).split()[1])

    before = kib("VmRSS:")
    action()
    return (kib("VmHWM:") - before) * 1024


def test_big_pictures_are_shrunk_while_decoding_and_moderate_ones_fit_as_before(tmp_path):
    # 8000 x 8000 JPEG: 256 MB decoded in full; JPEG decodes it at 1/8 scale instead
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=90)
    decoded = []
    growth = peak_rss_growth(lambda: decoded.append(read_image(tmp_path / "big.jpg")))
    assert growth < 64 * 2**20, f"peak resident memory grew {growth / 2**20:.0f} MiB"
    colour = torch.tensor([10, 200, 30], dtype=torch.int32)[:, None, None]
    assert (decoded[0].int() - colour).abs().max() <= 3

    # a moderate picture (shrunk 4 x before fitting) looks as fitting it at full size did
    rows, cols = np.mgrid[0:256, 0:384] / np.array([255, 383])[:, None, None]  # 0 .. 1
    smooth = (np.stack([rows * cols, np.sin(rows * 6) / 2 + 0.5, 1 - cols / 2]) * 255)
    smooth = smooth.round().astype(np.uint8)
    save_png(tmp_path / "moderate.png", smooth)
    difference = read_image(tmp_path / "moderate.png").int() - fit_to_input(
        torch.from_numpy(smooth)).int()
    assert difference.abs().max() <= 2 and difference.abs().float().mean() < 0.5


class RunsCode:
    """Pickled, a call of os.system: what a hostile models/model.pt would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_interrupt_while_a_picture_decodes_stops_instead_of_skipping_the_file(
        tmp_path, test_images, monkeypatch):
    """A signal arriving inside a decoder's C code can surface as a SystemError whose context is
    the KeyboardInterrupt: it must stop cifar-predict, not count as one unreadable file."""
    import cifar_alexnet.pictures as pictures

    save_png(tmp_path / "a.png", test_images[0])

    def interrupted(file, min_side):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError("<built-in method decode> returned a result with an exception set")

    monkeypatch.setattr(pictures, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_image(tmp_path / "a.png")

    def broken(file, min_side):  # the decoder's own failure is still that file's problem
        raise SystemError("a broken decoder")

    monkeypatch.setattr(pictures, "_decode", broken)
    with pytest.raises(PictureError, match="a broken decoder"):
        read_image(tmp_path / "a.png")


def test_a_model_that_would_run_code_is_refused_and_a_damaged_one_named(tmp_path):
    models, marker = tmp_path / "models", tmp_path / "code-ran"
    models.mkdir()
    torch.save({"model_state": {}, "class_names": NAMES, "hook": RunsCode(marker)},
               models / "model.pt")
    with pytest.raises(DataError) as refused:
        load_trained_model(models)
    message = str(refused.value)
    assert not marker.exists()
    assert "refused" in message and "would run code" in message
    assert f"{os.system.__module__}.system" in message  # the global the pickle references
    assert "`dvc checkout models`" in message and "`dvc repro --force train`" in message
    assert "weights_only" not in message and "\n" not in message  # not torch's advice

    torch.manual_seed(0)
    save_trained_model(models, build_model(ModelConfig("alexnet", 0.0625, 0.0, "batch")), NAMES,
                       1, 0.5, "no-run")
    whole = (models / "model.pt").read_bytes()
    for damage in (whole[:len(whole) // 2], b"not a model file at all " * 40):
        (models / "model.pt").write_bytes(damage)
        with pytest.raises(DataError) as damaged:
            load_trained_model(models)
        message = str(damaged.value)
        assert "truncated, damaged or not written by the train stage" in message
        assert "`dvc checkout models`" in message and "refused" not in message
        assert "weights_only" not in message and "\n" not in message


def start_predict(args: list[str], cwd: Path, **popen) -> tuple[subprocess.Popen, int]:
    """cifar-predict writing to a pipe that holds one page (4 KiB): the child blocks on any
    output the test has not read, so the test knows how far it can have got. Returns the child
    and the pipe's read end."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    try:
        child = subprocess.Popen([sys.executable, "-m", "cifar_alexnet.cifar_predict", *args], cwd=cwd,
                                 env=subprocess_env(), stdout=write_end, **popen)
    finally:
        os.close(write_end)
    return child, read_end


def read_pipe(fd: int, deadline: float, size: int | None = None) -> bytes:
    """Exactly ``size`` bytes from ``fd`` (never more: the writer must stay blocked), or with
    ``size=None`` everything up to the end."""
    data = b""
    while size is None or len(data) < size:
        assert select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0], \
            "cifar-predict wrote nothing more before the deadline"
        chunk = os.read(fd, 65536 if size is None else size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def pictures_named(directory: Path, images: np.ndarray, count: int, stem: str) -> list[str]:
    directory.mkdir()
    names = [str(directory / f"{i:02d}-{stem}.png") for i in range(count)]
    for i, name in enumerate(names):
        save_png(name, images[i % len(images)])
    return names


def test_results_are_printed_a_batch_at_a_time_with_a_progress_bar_on_a_terminal(
        model_project, test_images, tmp_path):
    root, _ = model_project
    # 32 pictures with long names: the first batch's JSON (about 25 KB) is far more than the
    # pipe holds, so the child is still writing it when the test has read 1000 bytes
    first = pictures_named(tmp_path / "first", test_images, 32, "a-rather-long-name" * 5)
    last = tmp_path / "last.png"
    last.write_text("not a picture yet")
    terminal, terminal_end = os.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 wide
    child, out = start_predict([*first, str(last), "--format", "json", "--top-k", "10",
                                "--batch-size", "32"], cwd=root, stderr=terminal_end)
    os.close(terminal_end)
    shown = []  # what the terminal shows, read as it comes (a full terminal would block)
    reader = threading.Thread(target=lambda: shown.extend(iter(
        lambda: read_terminal(terminal), b"")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        head = read_pipe(out, deadline, 1000)
        # Only now does the last file become a picture: had cifar-predict read every file
        # before printing, it would have found text there.
        save_png(tmp_path / "picture.png", test_images[0])
        os.replace(tmp_path / "picture.png", last)
        rows = json.loads(head + read_pipe(out, deadline))
        assert child.wait(timeout=60) == 0
    finally:
        os.close(out)
        child.kill()
    reader.join(timeout=10)
    os.close(terminal)
    assert [row["file"] for row in rows] == [*first, str(last)]
    assert all(len(row["predictions"]) == 10 for row in rows)
    assert b"classifying" in b"".join(shown) and b"33/33" in b"".join(shown)


def read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the child has exited and closed the terminal
        return b""


def test_sigterm_stops_between_batches_with_its_own_message(model_project, test_images,
                                                            tmp_path):
    root, _ = model_project
    files = pictures_named(tmp_path / "many", test_images, 40, "picture")
    with tempfile.TemporaryFile() as err:
        child, out = start_predict([*files, "--format", "json", "--top-k", "10",
                                    "--batch-size", "1"], cwd=root, stderr=err)
        try:
            deadline = time.monotonic() + 120
            # results have begun, and 40 results (about 25 KB) cannot fit the 4 KiB pipe: the
            # child is classifying, or waiting to write, far from the end
            head = read_pipe(out, deadline, 100)
            child.send_signal(signal.SIGTERM)
            printed = head + read_pipe(out, deadline)
            status = child.wait(timeout=60)
        finally:
            os.close(out)
            child.kill()
        err.seek(0)
        stderr = err.read().decode()
    assert status == 130, stderr[-3000:]
    rows = json.loads(printed)  # what was printed is complete: the array is closed
    assert 1 <= len(rows) < len(files)
    assert [row["file"] for row in rows] == files[:len(rows)]
    assert all(len(row["predictions"]) == 10 for row in rows)
    assert "results printed so far are complete" in stderr and "run it again" in stderr
    assert "training" not in stderr and "Traceback" not in stderr


def test_a_reader_that_stops_reading_ends_it_quietly(model_project, test_images, tmp_path):
    """`cifar-predict … | head`: when the reader goes away, no BrokenPipeError traceback."""
    root, _ = model_project
    files = pictures_named(tmp_path / "piped", test_images, 4, "picture")
    child = subprocess.Popen([sys.executable, "-m", "cifar_alexnet.cifar_predict", *files,
                              "--batch-size", "1"], cwd=root, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # the reader is gone before the first result is written
    stderr = child.stderr.read()
    assert child.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
