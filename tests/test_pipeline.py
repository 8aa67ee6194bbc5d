"""Bad archives through the real pipeline: `dvc repro` in a fresh git repository made from the
project stops with a clear error, a non-zero exit and nothing downstream. (One `dvc repro` that
works, checked through DVC's outputs, the MLflow store and `mlflow server`, is in
test_workflows.py: it is the first workflow of the matrix's ``pipeline`` project.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_alexnet.tools.synthetic import archive_members, write_tar_gz

from helpers import dvc, make_project, tiny_params

pytestmark = pytest.mark.slow


# --- rejections through the real pipeline: clear error, non-zero exit, nothing downstream ---

def assert_nothing_downstream(project: Path) -> None:
    for path in ("data/prepared", "models", "metrics", "reports"):
        assert not (project / path).exists(), path


def test_wrong_md5_stops_the_pipeline(archive, tmp_path):
    raw = tiny_params(archive)
    raw["data"]["md5"] = "f" * 32
    project = make_project(tmp_path / "project", raw)
    result = dvc("repro", cwd=project)
    assert result.returncode != 0
    assert f"expected {'f' * 32}" in result.stderr and f"found {archive.md5}" in result.stderr
    assert not any((project / "data/raw").glob("*"))  # no archive, no partial download
    assert_nothing_downstream(project)


@pytest.mark.parametrize("kind", ["truncated", "code-executing pickle"])
def test_bad_archive_with_matching_md5_stops_prepare(archive, tmp_path, kind):
    bad = tmp_path / "bad.tar.gz"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        bad.write_bytes(archive.path.read_bytes()[:5000])
        expected = "truncated or not a gzip'd tar archive"
    else:
        members = archive_members(per_batch=20, n_test=20)
        members["cifar-10-batches-py/test_batch"] = (
            b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
            + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
        write_tar_gz(bad, members)
        expected = "unsafe or invalid pickle"
    from cifar_alexnet.stages.download import md5sum

    raw = tiny_params(archive)
    raw["data"].update(url=bad.as_uri(), md5=md5sum(bad))
    project = make_project(tmp_path / "project", raw)
    result = dvc("repro", cwd=project)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert_nothing_downstream(project)
