import json
import subprocess
import sys

import pytest

from cifar_alexnet.metrics_check import main


@pytest.fixture
def files(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"accuracy": 0.80, "loss": 0.50, "macro_f1": 0.79}))

    def current(**values):
        path = tmp_path / "current.json"
        path.write_text(json.dumps({"accuracy": 0.80, "loss": 0.50, "macro_f1": 0.79, **values}))
        return str(path)
    return str(reference), current


def test_passes_within_tolerance(files, capsys):
    reference, current = files
    assert main([current(accuracy=0.805), reference, "--abs-tol", "0.01"]) == 0
    assert "all 3 metric(s) within tolerance" in capsys.readouterr().out


def test_fails_when_a_metric_moves_beyond_tolerance(files, capsys):
    reference, current = files
    assert main([current(accuracy=0.78), reference, "--abs-tol", "0.01"]) == 1
    captured = capsys.readouterr()
    assert "accuracy" in captured.err and "FAIL" in captured.out


def test_per_metric_and_relative_tolerances(files):
    reference, current = files
    loose_loss = current(loss=0.54)
    assert main([loose_loss, reference, "--abs-tol", "0.001"]) == 1
    assert main([loose_loss, reference, "--abs-tol", "0.001", "--rel-tol", "loss=0.1"]) == 0


def test_missing_metric_fails(tmp_path, files):
    reference, _ = files
    current = tmp_path / "partial.json"
    current.write_text(json.dumps({"accuracy": 0.8}))
    assert main([str(current), reference, "--abs-tol", "1"]) == 1


def test_console_script_exit_status(files):
    reference, current = files
    result = subprocess.run([sys.executable, "-m", "cifar_alexnet.metrics_check",
                             current(macro_f1=0.5), reference, "--abs-tol", "0.01"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "macro_f1" in result.stderr
