"""Fetch the CIFAR-10 archive from a URL, file:// URL or local path, verified by md5."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from .errors import DataError
from .io import atomic_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_source(url: str) -> tuple[BinaryIO, int | None]:
    """Open ``url`` for reading; plain paths and file:// URLs are read from disk."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # C:\ paths
        local = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) \
            if scheme == "file" else Path(url)
        if not local.is_file():
            raise DataError(f"archive not found: {local} (from data.url={url!r}); "
                            "check the path, or set data.url to where the archive is")
        return open(local, "rb"), local.stat().st_size
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (scheme checked by user)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url}: {reason}.\n"
            "If this machine is offline, fetch cifar-10-python.tar.gz elsewhere and either set "
            "data.url in params.yaml to its local path (or a file:// URL) or put it where the "
            "download stage writes it; it is used as-is once its md5 matches data.md5."
        ) from None
    length = response.headers.get("Content-Length")
    return response, int(length) if length else None


def fetch(url: str, md5: str, dest: str | Path) -> Path:
    """Make ``dest`` a verified copy of the archive at ``url``; skip if it is already verified.

    The download streams into a temporary file beside ``dest`` and only a file whose md5 matches
    is renamed into place, so a bad or interrupted download never leaves a file behind.
    """
    dest = Path(dest)
    md5 = md5.lower()
    if dest.is_file():
        found = md5sum(dest)
        if found == md5:
            log.info("%s already present with md5 %s; not downloading again", dest, md5)
            return dest
        log.warning("%s has md5 %s, expected %s; removing it and downloading again",
                    dest, found, md5)
        dest.unlink()

    source, size = _open_source(url)
    digest = hashlib.md5()
    with source, atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}",
        disable=None,
    ) as bar:
        try:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(f"download of {url} was interrupted: {exc}; run the stage again") \
                from None
        out.flush()
        found = digest.hexdigest()
        if found != md5:
            raise DataError(
                f"md5 mismatch for {url}: expected {md5} (data.md5), found {found}. "
                "The file is truncated, corrupt or a different archive; nothing was kept. "
                "Check data.url, or update data.md5 if you deliberately use another archive."
            )
    log.info("downloaded %s -> %s (md5 %s verified)", url, dest, md5)
    return dest

