import socket

import pytest

from cifar_alexnet.download import fetch, md5sum
from cifar_alexnet.errors import DataError


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


def test_corrupt_existing_file_is_removed_even_when_the_source_is_gone(tmp_path, archive):
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(archive.path.read_bytes()[:1000])
    with pytest.raises(DataError, match="archive not found"):
        fetch((tmp_path / "gone.tar.gz").as_uri(), archive.md5, dest)
    assert not dest.exists()


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
