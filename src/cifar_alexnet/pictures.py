"""Picture files decoded for classification, safely: what a person would see, in bounded memory.

Only regular files are opened (a FIFO or a device would block or never end). The header is read
first: more pixels than Pillow's decompression-bomb limit, or a picture longer than 20:1, is
refused before any pixel is decoded. Big pictures are shrunk while decoding (JPEG's DCT scaling,
then an integer box reduction, strip by strip), so memory holds the decoded picture once and no
float copy of it. EXIF orientation is applied; 16-bit and float pixels are scaled to 8 bit, and
values with no sensible reading as a picture are refused. Pillow and numpy only: no torch.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

MAX_ASPECT = 20  # longer side : shorter side
# Pixels converted at a time while shrinking (a strip as RGB is 4 bytes a pixel in Pillow).
STRIP_PIXELS = 1 << 22

# EXIF orientation -> the transposition that shows the picture upright (the table of
# ImageOps.exif_transpose, which can only transpose the full-size picture).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class PictureError(ValueError):
    """A file that is not classified; the message says why, without the file's name."""


def open_regular_file(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, else PictureError. The check is made
    on the opened descriptor (no window for a swap between check and open); O_NONBLOCK makes
    opening a FIFO return at once instead of waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PictureError(f"cannot be opened ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
            raise PictureError(f"not a regular file but {kind}")
        return os.fdopen(fd, "rb")  # O_NONBLOCK means nothing for a regular file's reads
    except BaseException:
        os.close(fd)
        raise


def decode_picture(path: Path, min_side: int) -> np.ndarray:
    """The picture in ``path`` as uint8 RGB (H, W, 3), upright, shrunk by an integer factor
    while decoding so that its shorter side stays at least ``min_side`` (a picture whose shorter
    side is under ``2 * min_side`` is decoded at full size, exactly). PictureError says why a
    file is not a picture that can be classified."""
    with open_regular_file(path) as file:
        try:
            # The bomb warning is for sizes under the limit we accept: such pictures are shrunk.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return _decode(file, min_side)
        except PictureError:
            raise
        except UnidentifiedImageError:
            raise PictureError("cannot be read as an image (not a picture format Pillow "
                               "reads)") from None
        except Image.DecompressionBombError as exc:
            raise PictureError(_too_many_pixels(str(exc))) from None
        except Exception as exc:  # noqa: BLE001 (a damaged or hostile file makes a decoder
            # raise almost any type; it is one bad file, and the others are still classified)
            interrupt = _interrupt_in(exc)
            if interrupt is not None:  # Ctrl-C or SIGTERM, not the file: stop as asked
                raise interrupt from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PictureError(f"cannot be read as an image ({reason})") from None


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an exception wraps, if any: a signal that arrives while C code
    runs can surface as a SystemError ("returned a result with an exception set") whose context
    is the interrupt; reported as an unreadable file, it would be lost."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _decode(file: BinaryIO, min_side: int) -> np.ndarray:
    with Image.open(file) as picture:  # reads the header only
        width, height = picture.size
        if min(width, height) < 1:
            raise PictureError(f"{width} x {height} pixels: an empty picture")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise PictureError(f"{width} x {height} pixels, longer than {MAX_ASPECT}:1 (CIFAR-10 "
                               "pictures are square: crop it closer to the subject)")
        factor = _shrink_factor(picture.size, min_side)
        if factor > 1:  # JPEG decodes at 1/2, 1/4 or 1/8 scale (a no-op for other formats)
            picture.draft(None, (width // factor, height // factor))
        picture.load()
        shrunk = _shrunk_rgb(picture, _shrink_factor(picture.size, min_side))
        method = _UPRIGHT.get(_orientation(picture))
    if method is not None:
        shrunk = shrunk.transpose(method)
    return np.array(shrunk)  # a copy: writable, and independent of Pillow's memory


def _shrink_factor(size: tuple[int, int], min_side: int) -> int:
    return max(1, min(size) // min_side)


def _orientation(picture: Image.Image) -> int:
    try:
        return int(picture.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 (a damaged EXIF block: viewers show the picture as stored)
        return 1


def _shrunk_rgb(picture: Image.Image, factor: int) -> Image.Image:
    """RGB, each ``factor`` x ``factor`` box of the picture's centre averaged, converted a strip
    at a time so that no full-size copy is made beside the decoded picture."""
    if factor == 1:
        return _to_rgb(picture)
    width, height = picture.size
    out_w, out_h = width // factor, height // factor
    # The boxes cover the centre; the dropped margin (under `factor` pixels) is split evenly.
    left, top = (width - out_w * factor) // 2, (height - out_h * factor) // 2
    rows = max(1, STRIP_PIXELS // (out_w * factor * factor))  # output rows per strip
    shrunk = Image.new("RGB", (out_w, out_h))
    for y in range(0, out_h, rows):
        n = min(rows, out_h - y)
        strip = picture.crop((left, top + y * factor, left + out_w * factor,
                              top + (y + n) * factor))
        shrunk.paste(_to_rgb(strip).reduce(factor), (0, y))
    return shrunk


def _to_rgb(picture: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows it. Pillow's own conversion clips 16-bit and float values at
    255 (a 16-bit picture turns white, a float one black): those are scaled instead."""
    mode = picture.mode
    if mode.startswith("I;16"):
        gray = np.asarray(picture) / 257  # 65535 -> 255
    elif mode == "I":  # 32-bit integers: Pillow's form of 16-bit data (it saves I as 16-bit PNG)
        values = np.asarray(picture)
        _refuse_outside(values, 0, 65535, "32-bit integer")
        gray = values / 257
    elif mode == "F":
        values = np.asarray(picture)
        _refuse_outside(values, 0, 1, "float")
        gray = values * 255.0
    else:
        return picture if mode == "RGB" else picture.convert("RGB")
    return Image.fromarray(np.rint(gray).astype(np.uint8), "L").convert("RGB")


def _refuse_outside(values: np.ndarray, low: float, high: float, kind: str) -> None:
    inside = (values >= low) & (values <= high)  # NaN is outside
    if not inside.all():
        example = values[~inside].flat[0]
        raise PictureError(f"{kind} pixel values outside [{low}, {high}] (such as {example:g}): "
                           "no sensible reading as a picture")


def _too_many_pixels(pillow_message: str) -> str:
    # Pillow refuses while reading the header, before we see the size; its message (here since
    # Pillow 9) holds the pixel count and the limit, 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx).
    numbers = [int(n) for n in re.findall(r"(\d+) pixels", pillow_message)]
    if len(numbers) != 2:
        return f"too many pixels ({pillow_message})"
    pixels, limit = numbers
    side = int(limit ** 0.5)
    return (f"{pixels:,} pixels, over the limit of {limit:,} (about {side:,} x {side:,}): "
            "refused before decoding; scale it down first")
