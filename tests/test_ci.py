"""CI as users adopt it: the GitHub workflow lints clean and runs the README's commands through
.ci/run; the committed checks spec and reference agree; the report prints the same table."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cifar_alexnet.config import params_from_dict
from cifar_alexnet.tools.metrics_check import load_spec

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github/workflows/ci.yml"


def readme_commands() -> tuple[list[str], str]:
    """The README's "Quick start" test command, split into its install steps and the test."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines()
                if "pip install" in line and line.rstrip().endswith("pytest"))
    *install, test = [part.strip() for part in line.split("&&")]
    return install, test


def shell_function(script: str, name: str) -> str:
    match = re.search(rf"^{name}\(\) {{\n(.*?)^}}", script, re.S | re.M)
    assert match, f"no function {name}() in .ci/run"
    return match.group(1)


def test_ci_run_performs_the_readme_install_then_its_test_command():
    install, test = readme_commands()
    script = (ROOT / ".ci/run").read_text()
    install_lines = [line.strip() for line in shell_function(script, "install").splitlines()]
    positions = [install_lines.index(step) for step in install]  # ValueError: a step is missing
    assert positions == sorted(positions), "the install steps run in the README's order"
    assert test in [line.strip() for line in shell_function(script, "run_tests").splitlines()]
    all_steps = re.search(r"^\s*all\) (.*) ;;$", script, re.M).group(1)
    assert all_steps.split("; ") == ["install", "run_tests", "reproduce"]


def ci_run_commands(job: dict) -> list[str]:
    """The .ci/run commands a workflow job's steps call, in order."""
    words = [shlex.split(step["run"]) for step in job["steps"] if "run" in step]
    assert all(w[:2] == ["bash", ".ci/run"] for w in words), words  # nothing of its own
    return [w[2] for w in words]


def test_the_workflow_installs_as_the_readme_then_runs_what_ci_runs_everywhere():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    usage = subprocess.run(["bash", ".ci/run", "no-such-step"], cwd=ROOT, capture_output=True,
                           text=True)
    assert usage.returncode == 2
    for name, job in workflow["jobs"].items():
        commands = ci_run_commands(job)
        assert commands[0] == "install", name  # the README's install first, in every job
        assert all(c in usage.stderr for c in commands), (name, commands)  # steps .ci/run has
    # the test job does what `bash .ci/run` does, step by step, then reports
    assert ci_run_commands(workflow["jobs"]["test"])[:3] == ["install", "test", "reproduce"]


def test_actionlint_reports_nothing_on_the_workflow(tmp_path):
    result = subprocess.run(["bash", ".ci/actionlint", str(WORKFLOW)], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode == 127 and not os.environ.get("CI"):
        pytest.skip("actionlint is not installed: `bash .ci/run install` installs it")
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr
    # ...and it is a real linter: a misspelt context is reported
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("github.base_ref", "github.base_rf"))
    result = subprocess.run(["bash", ".ci/actionlint", str(broken)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "base_rf" in result.stdout


def test_committed_reference_has_a_value_for_every_check_and_every_check_says_why():
    spec = load_spec(ROOT / ".ci/checks.yaml")
    reference = json.loads((ROOT / ".ci/reference.json").read_text())
    for check in spec.checks:
        assert check.why, f"{check.file}: {check.metric} has no `why`"
        if check.min is None:
            assert check.metric in reference.get(check.file, {}), (check.file, check.metric)


def test_report_prints_the_reproduced_table_images_and_diffs_against_a_base(tmp_path):
    out = tmp_path / "ci-report"
    (out / "native/reports").mkdir(parents=True)
    (out / "native/reports/confusion_matrix.png").write_bytes(b"png")
    (out / "metrics.md").write_text("| file | metric |\n| --- | --- |\n")
    result = subprocess.run(["bash", ".ci/report", str(out), "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "| file | metric |" in report
    assert "- native/reports/confusion_matrix.png" in report
    if (ROOT / ".git").exists():  # a git checkout: the dvc diffs against HEAD (none)
        assert "**`dvc params diff HEAD`**" in report and "**`dvc metrics diff HEAD`**" in report


def test_report_shows_a_param_changed_since_the_base_revision(tmp_path):
    repo = tmp_path / "project"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci/report").write_text((ROOT / ".ci/report").read_text())
    (repo / "params.yaml").write_text("train:\n  lr: 0.002\n")
    (repo / "dvc.yaml").write_text("stages:\n  train:\n    cmd: 'true'\n    params: [train.lr]\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    [*git, "commit", "-qm", "base"]):
        subprocess.run(command, cwd=repo, check=True)
    (repo / "params.yaml").write_text("train:\n  lr: 0.01\n")
    result = subprocess.run(["bash", ".ci/report", str(tmp_path / "none"), "HEAD"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "No reproduction results" in result.stdout
    diff_row = next(line for line in result.stdout.splitlines() if "train.lr" in line)
    assert "0.002" in diff_row and "0.01" in diff_row


def test_ci_params_are_the_projects_params_with_ci_values_laid_over(tmp_path):
    """reproduce-metrics' own params step, run on the committed files: what it writes loads as a
    full configuration, keeps CI's values and takes any key CI does not name from params.yaml."""
    script = (ROOT / ".ci/reproduce-metrics").read_text()
    step = next(body for body in re.findall(r"python - <<'PY'\n(.*?)\nPY", script, re.S)
                if "archive.txt" in body)
    (tmp_path / ".ci").mkdir()
    project = yaml.safe_load((ROOT / "params.yaml").read_text())
    ci = yaml.safe_load((ROOT / ".ci/params.yaml").read_text())
    project["train"]["nproc_added_later"] = 1  # a key params.yaml gained that CI does not name
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project))
    (tmp_path / ".ci/params.yaml").write_text(yaml.safe_dump(ci))
    (tmp_path / "archive.txt").write_text("url: file:///tmp/a.tar.gz\nmd5: " + "0" * 32 + "\n")
    subprocess.run(["python", "-c", step], cwd=tmp_path, check=True)
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert written["train"]["nproc_added_later"] == 1
    assert written["data"]["url"] == "file:///tmp/a.tar.gz"
    assert {k: v for k, v in written["train"].items() if k in ci["train"]} == ci["train"]
    del written["train"]["nproc_added_later"]
    params_from_dict(written, "CI params")  # every key present and valid
