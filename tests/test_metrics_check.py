"""check-metrics: two metric files or a spec over several runs, tolerances, exit status, the Markdown
table."""

import json
import subprocess
import sys

import pytest

from cifar_alexnet.tools.metrics_check import main


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
    result = subprocess.run([sys.executable, "-m", "cifar_alexnet.tools.metrics_check",
                             current(macro_f1=0.5), reference, "--abs-tol", "0.01"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "macro_f1" in result.stderr


# --- spec mode: what .ci/reproduce-metrics and the CI job summary use ---------------------------

SPEC = """
metrics/evaluate.json:
  accuracy: {abs: 0.01, why: "5 of 500 test images"}
  loss: {rel: 0.02, why: "loss moves smoothly"}
tune/summary.json:
  best_trial: {abs: 0, why: "exact while the lead is clear"}
  best_margin: {min: 0.02, why: "a lead over twice the per-trial tolerance"}
tune/trials.csv:
  key: number
  metrics:
    1.value: {abs: 0.02, why: "a trial's val acc"}
"""


def make_run(root, name, accuracy=0.6, margin=0.05, trial1=0.5):
    run = root / name
    (run / "metrics").mkdir(parents=True)
    (run / "tune").mkdir()
    (run / "metrics/evaluate.json").write_text(json.dumps({"accuracy": accuracy, "loss": 1.0}))
    (run / "tune/summary.json").write_text(json.dumps(
        {"study_name": "s", "best_trial": 1, "best_margin": margin}))
    (run / "tune/trials.csv").write_text(f"number,value,state\n0,0.4,COMPLETE\n1,{trial1},COMPLETE\n")
    return run


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "checks.yaml"
    path.write_text(SPEC)
    return path


def test_spec_writes_a_reference_then_checks_several_runs_in_one_table(tmp_path, spec, capsys):
    reference = tmp_path / "reference.json"
    first = make_run(tmp_path, "a")
    assert main(["--spec", str(spec), "--reference", str(reference), str(first),
                 "--write-reference"]) == 0
    written = json.loads(reference.read_text())
    # min checks need no reference value; CSV cells are keyed by the key column
    assert written == {"metrics/evaluate.json": {"accuracy": 0.6, "loss": 1.0},
                       "tune/summary.json": {"best_trial": 1.0},
                       "tune/trials.csv": {"1.value": 0.5}}
    capsys.readouterr()
    within = make_run(tmp_path, "b", accuracy=0.605, trial1=0.515)
    assert main(["--spec", str(spec), "--reference", str(reference), str(first), str(within),
                 "--name", "native", "--name", "avx2", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| file | metric | reference | native | avx2 | spread | allowed | status |" in table
    assert "| tune/trials.csv | 1.value | 0.5 | 0.5 | 0.515 | 0.015 | ± 0.02 | ok |" in table


def test_spec_fails_naming_the_run_and_metric_outside_tolerance(tmp_path, spec, capsys):
    reference = tmp_path / "reference.json"
    main(["--spec", str(spec), "--reference", str(reference), str(make_run(tmp_path, "a")),
          "--write-reference"])
    capsys.readouterr()
    moved = make_run(tmp_path, "b", accuracy=0.62)
    assert main(["--spec", str(spec), "--reference", str(reference),
                 str(make_run(tmp_path, "c")), str(moved)]) == 1
    captured = capsys.readouterr()
    assert "FAIL (b)" in captured.out and "accuracy" in captured.err


def test_spec_refuses_to_write_a_reference_whose_min_check_fails(tmp_path, spec, capsys):
    reference = tmp_path / "reference.json"
    assert main(["--spec", str(spec), "--reference", str(reference),
                 str(make_run(tmp_path, "a", margin=0.01)), "--write-reference"]) == 1
    assert not reference.exists()
    assert "best_margin" in capsys.readouterr().err


def test_spec_with_unknown_check_fields_is_refused(tmp_path):
    bad = tmp_path / "checks.yaml"
    bad.write_text("metrics/evaluate.json:\n  accuracy: {tolerance: 0.01}\n")
    assert main(["--spec", str(bad), "--reference", str(tmp_path / "r.json"),
                 str(make_run(tmp_path, "a"))]) == 2
