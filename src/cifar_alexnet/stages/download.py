"""Fetch the CIFAR-10 archive from a URL, file:// URL or local path, verified by md5."""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import netrc
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator

from tqdm import tqdm

from cifar_alexnet.config import DATA_PASSWORD_ENV, DATA_URL_ENV, DATA_USER_ENV
from cifar_alexnet.errors import DataError
from cifar_alexnet.files import atomic_path, remove_dead_writers_files
from cifar_alexnet.redact import redact_url

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# A download slower than this over a whole window is given up (CIFAR-10 is 163 MB: 16 KiB/s
# would already take 3 hours).
MIN_BYTES_PER_S, RATE_WINDOW_S = 16 * 1024, 60.0


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


_SCHEMES = ("http", "https", "ftp")


def _is_local(scheme: str, url: str) -> bool:
    return scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))  # C:\


def source_url(configured: str) -> str:
    """Where to download from: ``$CIFAR_DATA_URL`` when set (a URL that holds a secret, e.g. a
    presigned link, which must not be a param), else data.url."""
    return os.environ.get(DATA_URL_ENV) or configured


def _stored_credentials(host: str | None) -> tuple[str, str] | None:
    """``$CIFAR_DATA_USER``/``$CIFAR_DATA_PASSWORD``, else the host's ``~/.netrc`` entry."""
    user, password = os.environ.get(DATA_USER_ENV), os.environ.get(DATA_PASSWORD_ENV)
    if user or password:
        return user or "", password or ""
    try:
        entry = netrc.netrc().authenticators(host or "")
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one we cannot use
        return None
    return (entry[0] or "", entry[2] or "") if entry else None


def _request(url: str) -> urllib.request.Request:
    """A request for ``url`` with HTTP Basic auth from the URL's ``user:password@`` (given by
    ``$CIFAR_DATA_URL``), else from the environment or ``~/.netrc``.

    urllib would otherwise take ``user:password@host`` for the host name (and print it in the
    resulting error). The header is not forwarded on redirects.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):  # ftp reads user:password@ itself
        return urllib.request.Request(url)
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        credentials: tuple[str, str] | None = (urllib.parse.unquote(user),
                                               urllib.parse.unquote(password))
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    else:
        credentials = _stored_credentials(parts.hostname)
    request = urllib.request.Request(url)
    if credentials:
        token = ":".join(credentials)
        request.add_unredirected_header("Authorization",
                                        "Basic " + base64.b64encode(token.encode()).decode())
    return request


def _open_source(url: str) -> tuple[BinaryIO, int | None]:
    """Open ``url`` for reading; plain paths and file:// URLs are read from disk."""
    shown = redact_url(url)
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError as exc:  # e.g. an unclosed [IPv6] bracket
        raise DataError(f"data.url={shown!r} is not a valid URL ({exc}); set data.url to an "
                        "https:// or file:// URL, or a local path") from None
    scheme = parsed.scheme
    if _is_local(scheme, url):
        local = Path(urllib.request.url2pathname(parsed.path)) if scheme == "file" else Path(url)
        if not local.is_file():
            raise DataError(f"archive not found: {local} (from data.url={shown!r}); "
                            "check the path, or set data.url to where the archive is")
        try:
            return open(local, "rb"), local.stat().st_size
        except OSError as exc:
            raise DataError(f"cannot read {local} (from data.url={shown!r}): {exc.strerror}; "
                            "check its permissions") from None
    if scheme.lower() not in _SCHEMES:
        raise DataError(f"data.url={shown!r} has the unsupported scheme {scheme!r}; use "
                        "https://, http://, ftp://, file:// or a local path")
    try:
        response = urllib.request.urlopen(_request(url), timeout=60)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download {shown}: the server answered HTTP {exc.code} "
                        f"{exc.reason}; check data.url") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {shown}: {reason}.\n"
            "If this machine is offline, fetch cifar-10-python.tar.gz elsewhere and either set "
            "data.url in params.yaml to its local path (or a file:// URL) or put it where the "
            "download stage writes it; it is used as-is once its md5 matches data.md5."
        ) from None
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None


def _chunks(source: BinaryIO, shown: str, size: int | None) -> Iterator[bytes]:
    """Read ``source`` to the end; a broken, short or stalled transfer is a DataError, not a bad
    md5. Stalled: under MIN_BYTES_PER_S over a RATE_WINDOW_S window (a mirror trickling a byte
    every 20 s never trips the per-read timeout, and would take years)."""
    received = 0
    read = getattr(source, "read1", source.read)  # what has arrived, not a full CHUNK
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            chunk = read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise DataError(f"download of {shown} was interrupted after {received} bytes "
                            f"({type(exc).__name__}: {exc}); run the stage again") from None
        if not chunk:
            break
        received += len(chunk)
        window_bytes += len(chunk)
        elapsed = time.monotonic() - window_start
        if elapsed >= RATE_WINDOW_S:
            if window_bytes < MIN_BYTES_PER_S * elapsed:
                raise DataError(
                    f"download of {shown} stalled: {window_bytes} bytes in the last "
                    f"{elapsed:.0f} s (below {MIN_BYTES_PER_S // 1024} KiB/s), {received} bytes "
                    "in all; try again later or another mirror, or fetch the archive elsewhere "
                    "and set data.url to its path")
            window_start, window_bytes = time.monotonic(), 0
        yield chunk
    if size is not None and received < size:
        raise DataError(f"download of {shown} was interrupted: got {received} of {size} bytes; "
                        "run the stage again")


def fetch(url: str, md5: str, dest: str | Path) -> Path:
    """Make ``dest`` a verified copy of the archive at ``url``; skip if it is already verified.

    The download streams into a temporary file beside ``dest`` and only a file whose md5 matches
    is renamed into place, so a bad or interrupted download never leaves a file behind. Passwords
    and tokens in ``url`` never appear in logs or messages (see :func:`redact_url`).
    """
    dest = Path(dest)
    md5 = md5.lower()
    remove_dead_writers_files(dest)  # an interrupted earlier download's partial file
    if dest.is_file():
        found = md5sum(dest)
        if found == md5:
            log.info("%s already present with md5 %s; not downloading again", dest, md5)
            return dest
        # It may be the user's own archive and data.md5 the typo: it stays until a verified
        # download replaces it (the rename below), and a failure says how to keep using it.
        log.warning("%s has md5 %s, not data.md5 %s; downloading a replacement (the file stays "
                    "until a verified one replaces it)", dest, found, md5)
        try:
            return _download(url, md5, dest)
        except DataError as exc:
            raise DataError(f"{exc}\n{dest} was kept (md5 {found}): if it is the archive you "
                            f"mean to use, set data.md5 to {found}") from None
    return _download(url, md5, dest)


def _download(url: str, md5: str, dest: Path) -> Path:
    shown = redact_url(url)
    source, size = _open_source(url)
    digest = hashlib.md5()
    with source, atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
        total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}",
        disable=None,
    ) as bar:
        # Write errors (disk full...) propagate as OSError and atomic_path reports them.
        for chunk in _chunks(source, shown, size):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
        out.flush()
        found = digest.hexdigest()
        if found != md5:
            raise DataError(
                f"md5 mismatch for {shown}: expected {md5} (data.md5), found {found}. "
                "The file is truncated, corrupt or a different archive; nothing was kept. "
                "Check data.url, or update data.md5 if you deliberately use another archive."
            )
    log.info("downloaded %s -> %s (md5 %s verified)", shown, dest, md5)
    return dest
