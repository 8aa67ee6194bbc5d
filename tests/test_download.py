"""The download stage's fetch: md5 verification, local paths and file:// URLs, HTTP through a loopback
server, credentials, stalls."""

import base64
import http.server
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from cifar_alexnet.stages.download import fetch, md5sum, source_url
from cifar_alexnet.errors import DataError
from cifar_alexnet.files import OutputError
from cifar_alexnet.redact import redact_url


def test_file_url_and_plain_path_are_fetched_and_verified(tmp_path, archive):
    by_url = fetch(archive.url, archive.md5, tmp_path / "a" / "archive.tar.gz")
    by_path = fetch(str(archive.path), archive.md5, tmp_path / "b" / "archive.tar.gz")
    assert md5sum(by_url) == md5sum(by_path) == archive.md5
    assert by_url.read_bytes() == archive.path.read_bytes()


def test_verified_archive_is_not_downloaded_again(tmp_path, archive):
    dest = fetch(archive.url, archive.md5, tmp_path / "archive.tar.gz")
    # The source no longer exists: a second fetch must use the verified local copy.
    gone = (tmp_path / "missing.tar.gz").as_uri()
    assert fetch(gone, archive.md5, dest) == dest
    assert md5sum(dest) == archive.md5


@pytest.mark.parametrize("source", ["unreachable", "other archive"])
def test_a_mistyped_md5_keeps_the_users_own_archive_and_names_its_md5(tmp_path, archive, source):
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    dest.parent.mkdir()
    dest.write_bytes(archive.path.read_bytes())  # the user's own copy, placed by hand
    typo = archive.md5[:-1] + ("0" if archive.md5[-1] != "0" else "1")
    url = (tmp_path / "missing.tar.gz").as_uri() if source == "unreachable" else archive.url
    with pytest.raises(DataError) as info:
        fetch(url, typo, dest)
    assert f"set data.md5 to {archive.md5}" in str(info.value)
    assert dest.read_bytes() == archive.path.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp file either


def test_an_archive_that_fails_its_md5_is_replaced_by_a_verified_download(tmp_path, archive):
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    dest.parent.mkdir()
    dest.write_bytes(b"an older, damaged copy")
    assert fetch(archive.url, archive.md5, dest) == dest
    assert md5sum(dest) == archive.md5


def test_md5_mismatch_says_expected_and_found_and_keeps_nothing(tmp_path, archive):
    dest = tmp_path / "raw" / "archive.tar.gz"
    wrong = "0" * 32
    with pytest.raises(DataError) as info:
        fetch(archive.url, wrong, dest)
    message = str(info.value)
    assert f"expected {wrong}" in message and f"found {archive.md5}" in message
    assert list(dest.parent.iterdir()) == []  # neither the archive nor a partial temp file


def test_corrupt_existing_file_is_replaced(tmp_path, archive):
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(archive.path.read_bytes()[:1000])
    fetch(archive.url, archive.md5, dest)
    assert md5sum(dest) == archive.md5


def test_corrupt_existing_file_stays_when_the_source_is_gone(tmp_path, archive):
    # Kept, not deleted: it may be the user's archive with data.md5 mistyped. The stage fails,
    # so nothing downstream uses it.
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(archive.path.read_bytes()[:1000])
    with pytest.raises(DataError, match="archive not found") as info:
        fetch((tmp_path / "gone.tar.gz").as_uri(), archive.md5, dest)
    assert f"set data.md5 to {md5sum(dest)}" in str(info.value)
    assert dest.read_bytes() == archive.path.read_bytes()[:1000]


def test_unreachable_server_explains_how_to_supply_the_archive(tmp_path):
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError) as info:
        fetch(f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", "0" * 32,
              tmp_path / "archive.tar.gz")
    assert "cannot download" in str(info.value)
    assert "set data.url" in str(info.value)
    assert not (tmp_path / "archive.tar.gz").exists()


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(DataError, match="archive not found: .*nope.tar.gz"):
        fetch(str(tmp_path / "nope.tar.gz"), "0" * 32, tmp_path / "out.tar.gz")


# --- Loopback HTTP server ----------------------------------------------------------------------

@dataclass
class Server:
    """What the loopback server answers, and the Authorization headers it was sent."""
    body: bytes = b""
    status: int = 200
    content_length: int | None = None  # claim more than ``body`` to simulate a cut connection
    auth_headers: list = field(default_factory=list)
    url: str = ""
    seconds_per_byte: float = 0.0  # > 0: send the body one byte at a time (a trickling mirror)


@pytest.fixture
def server():
    state = Server()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            state.auth_headers.append(self.headers.get("Authorization"))
            self.send_response(state.status)
            length = state.content_length if state.content_length is not None else len(state.body)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if state.seconds_per_byte:
                for byte in state.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(state.seconds_per_byte)
            else:
                self.wfile.write(state.body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_http_download_sends_userinfo_as_basic_auth_and_never_logs_the_password(
        tmp_path, archive, server, caplog):
    server.body = archive.path.read_bytes()
    url = server.url.replace("http://", "http://alice:s3cret%40x@") + "/cifar-10-python.tar.gz"
    with caplog.at_level(logging.DEBUG):
        dest = fetch(url, archive.md5, tmp_path / "archive.tar.gz")
    assert md5sum(dest) == archive.md5
    assert server.auth_headers == ["Basic " + base64.b64encode(b"alice:s3cret@x").decode()]
    assert "s3cret" not in caplog.text and "alice:***@127.0.0.1" in caplog.text


def test_http_error_status_is_named_without_the_password(tmp_path, server):
    server.status, server.body = 404, b"not here"
    url = server.url.replace("http://", "http://alice:s3cret@") + "/cifar.tar.gz?token=abc"
    with pytest.raises(DataError) as info:
        fetch(url, "0" * 32, tmp_path / "archive.tar.gz")
    message = str(info.value)
    assert message == (f"cannot download {server.url.replace('http://', 'http://alice:***@')}"
                       "/cifar.tar.gz?token=***: the server answered HTTP 404 Not Found; "
                       "check data.url")
    assert not (tmp_path / "archive.tar.gz").exists() and list(tmp_path.iterdir()) == []


def test_connection_cut_mid_transfer_says_so_and_keeps_nothing(tmp_path, archive, server):
    data = archive.path.read_bytes()
    server.body, server.content_length = data[:5000], len(data)
    with pytest.raises(DataError) as info:
        fetch(server.url + "/cifar-10-python.tar.gz", archive.md5, tmp_path / "archive.tar.gz")
    assert str(info.value) == (f"download of {server.url}/cifar-10-python.tar.gz was "
                               f"interrupted: got 5000 of {len(data)} bytes; run the stage again")
    assert list(tmp_path.iterdir()) == []


# --- Bad data.url values and destinations --------------------------------------------------------

def test_unsupported_scheme_is_named(tmp_path):
    with pytest.raises(DataError) as info:
        fetch("htps://user:pw@example.com/cifar.tar.gz", "0" * 32, tmp_path / "a.tar.gz")
    assert str(info.value) == ("data.url='htps://user:***@example.com/cifar.tar.gz' has the "
                               "unsupported scheme 'htps'; use https://, http://, ftp://, "
                               "file:// or a local path")


def test_malformed_url_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.url='http://\[::1/cifar.tar.gz' is not a valid URL"):
        fetch("http://[::1/cifar.tar.gz", "0" * 32, tmp_path / "a.tar.gz")


def test_unreachable_server_message_masks_the_password(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError) as info:
        fetch(f"https://bob:hunter2@127.0.0.1:{port}/c.tar.gz", "0" * 32, tmp_path / "a.tar.gz")
    assert f"cannot download https://bob:***@127.0.0.1:{port}/c.tar.gz:" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_md5_mismatch_message_masks_a_token_in_the_query(tmp_path, archive):
    url = archive.url + "?token=abcdef"
    with pytest.raises(DataError) as info:
        fetch(url, "0" * 32, tmp_path / "a.tar.gz")
    assert f"md5 mismatch for {archive.url}?token=***:" in str(info.value)
    assert "abcdef" not in str(info.value)


def test_destination_that_is_a_directory_is_reported(tmp_path, archive):
    (tmp_path / "archive.tar.gz").mkdir()
    with pytest.raises(OutputError) as info:
        fetch(archive.url, archive.md5, tmp_path / "archive.tar.gz")
    assert str(info.value).startswith(
        f"cannot write {tmp_path / 'archive.tar.gz'}: Is a directory; a directory is in the way")
    assert [p.name for p in tmp_path.iterdir()] == ["archive.tar.gz"]


# --- redact_url --------------------------------------------------------------------------------

@pytest.mark.parametrize("url,shown", [
    ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
    ("mysql+pymysql://optuna:p@ss:w0rd@db.example.com:3306/study?charset=utf8mb4",
     "mysql+pymysql://optuna:***@db.example.com:3306/study?charset=utf8mb4"),
    ("https://ghp_0123456789abcdef@github.com/org/repo.git",   # a token as the user name
     "https://***@github.com/org/repo.git"),
    ("https://host/file.tar.gz?password=a&token=b&secret=c&key=d&api_key=e&keep=f",
     "https://host/file.tar.gz?password=***&token=***&secret=***&key=***&api_key=***&keep=f"),
    ("https://bucket.s3.amazonaws.com/c.tar.gz?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff"
     "&X-Amz-Expires=60",
     "https://bucket.s3.amazonaws.com/c.tar.gz?X-Amz-Credential=***&X-Amz-Signature=***"
     "&X-Amz-Expires=60"),
    ("https://host/cb#access_token=xyz&state=1", "https://host/cb#access_token=***&state=1"),
    ("sqlite:////home/me/optuna.db", "sqlite:////home/me/optuna.db"),
    ("https://user:@host/", "https://user:@host/"),                  # nothing to hide
    ("https://host/a@b?next=c@d", "https://host/a@b?next=c@d"),      # @ after the host
    ("/data/cifar-10-python.tar.gz", "/data/cifar-10-python.tar.gz"),
    ("data/odd?token=name.tar.gz", "data/odd?token=name.tar.gz"),     # a path, not a query
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def basic(token: bytes) -> str:
    return "Basic " + base64.b64encode(token).decode()


def test_credentials_come_from_the_environment_not_the_url(tmp_path, archive, server,
                                                           monkeypatch, caplog):
    server.body = archive.path.read_bytes()
    monkeypatch.setenv("CIFAR_DATA_USER", "alice")
    monkeypatch.setenv("CIFAR_DATA_PASSWORD", "s3cret")
    with caplog.at_level(logging.DEBUG):
        fetch(server.url + "/cifar.tar.gz", archive.md5, tmp_path / "archive.tar.gz")
    assert server.auth_headers == [basic(b"alice:s3cret")]
    assert "s3cret" not in caplog.text


def test_credentials_come_from_netrc(tmp_path, archive, server, monkeypatch):
    server.body = archive.path.read_bytes()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login bob password hunter2\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CIFAR_DATA_USER", raising=False)
    monkeypatch.delenv("CIFAR_DATA_PASSWORD", raising=False)
    fetch(server.url + "/cifar.tar.gz", archive.md5, tmp_path / "archive.tar.gz")
    assert server.auth_headers == [basic(b"bob:hunter2")]


def test_a_secret_url_is_taken_from_the_environment(monkeypatch):
    assert source_url("https://example.com/c.tar.gz") == "https://example.com/c.tar.gz"
    monkeypatch.setenv("CIFAR_DATA_URL", "https://example.com/c.tar.gz?sig=s3cret")
    assert source_url("https://example.com/c.tar.gz") == \
        "https://example.com/c.tar.gz?sig=s3cret"


@pytest.mark.slow
def test_a_download_password_reaches_no_file_the_pipeline_writes(tmp_path, archive, server):
    """dvc.lock, mlflow.db, mlruns/, the DVC cache, every output: none holds the password."""
    import sys

    from helpers import make_project, run, tiny_params

    server.body = archive.path.read_bytes()
    secret = "s3cret-e2e-7f3a"
    raw = tiny_params(archive, train={"epochs": 1}, tune={"n_trials": 0})
    raw["data"]["url"] = server.url + "/cifar-10-python.tar.gz"
    project = make_project(tmp_path / "project", raw)
    refused = run([sys.executable, "pipeline/download.py", "--out", "data/raw/x.tar.gz", "--set",
                   f"data.url={server.url.replace('//', f'//alice:{secret}@')}/c.tar.gz"],
                  cwd=project)
    assert refused.returncode == 1 and "CIFAR_DATA_PASSWORD" in refused.stderr
    assert secret not in refused.stderr + refused.stdout
    result = run([sys.executable, "-m", "dvc", "repro"], cwd=project,
                 CIFAR_DATA_USER="alice", CIFAR_DATA_PASSWORD=secret)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert server.auth_headers == [basic(f"alice:{secret}".encode())]
    assert secret not in result.stdout + result.stderr
    written = [p for p in project.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert {"dvc.lock", "mlflow.db"} <= {p.name for p in written}
    assert any("mlruns" in p.parts for p in written) and any(".dvc" in p.parts for p in written)
    leaks = [p for p in written if secret.encode() in p.read_bytes()]
    assert leaks == []


def test_a_trickling_mirror_is_given_up_with_a_message(tmp_path, archive, server, monkeypatch):
    """A byte every 20 s never trips the per-read timeout; the minimum rate does (scaled down
    here: 1 000 bytes/s over 1 s windows, against a byte every 50 ms)."""
    import cifar_alexnet.stages.download as download

    monkeypatch.setattr(download, "MIN_BYTES_PER_S", 1000)
    monkeypatch.setattr(download, "RATE_WINDOW_S", 1.0)
    server.body, server.seconds_per_byte = archive.path.read_bytes()[:120], 0.05
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        fetch(server.url + "/cifar.tar.gz", archive.md5, tmp_path / "archive.tar.gz")
    assert "stalled" in str(info.value) and "another mirror" in str(info.value)
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []  # nothing kept


def test_an_interrupted_downloads_partial_file_is_removed_even_when_nothing_is_downloaded(
        tmp_path, archive):
    import subprocess
    import sys

    dest = tmp_path / "archive.tar.gz"
    fetch(archive.url, archive.md5, dest)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    partial = tmp_path / f".archive.tar.gz.{dead}-abcd1234.tmp"  # as atomic_path names it
    partial.write_bytes(b"x" * 1000)
    fetch(archive.url, archive.md5, dest)  # already verified: nothing is downloaded...
    assert not partial.exists()  # ...and the dead writer's partial file is gone
