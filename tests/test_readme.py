"""The README's set-up block, taken from the README itself and run literally: its first line (set-up, then the
main job on the embedded default) in a clean shell on a fresh clone; its second line (the tests) is what CI runs.
If the README's commands change, these tests run the new ones."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from nanochat.stage_table import DEFAULT_STAGES

ROOT = Path(__file__).resolve().parent.parent
# a login shell's PATH, nothing from this process's environment (no venv, no PYTHONPATH)
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def setup_block() -> list[str]:
    """The indented command lines under the README's set-up heading."""
    section = (ROOT / "README.md").read_text().split("## Set-up", 1)[1]
    block = re.search(r"\n\n((?: {4}\S.*\n)+)", section).group(1)
    return [line.strip() for line in block.splitlines()]


def test_ci_runs_the_readmes_test_command():
    main_job, tests = setup_block()
    assert main_job.startswith("bash .ci/setup && ") and "experiments.launch" in main_job
    test_command = tests.split("#")[0].strip()
    assert test_command == "bash .ci/setup && bash tests/run_tiers.sh"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash .ci/setup" in ci and "bash tests/run_tiers.sh" in ci


@pytest.mark.readme
@pytest.mark.timeout(45 * 60)  # set-up and the whole embedded pipeline: ~17 minutes on 2 cores
def test_readme_setup_and_main_job_literally_on_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone, base = tmp_path / "clone", tmp_path / "base"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    main_job = setup_block()[0]
    # a clean shell: no venv, no PYTHONPATH; HOME kept for pip's cache, the base dir fresh
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": CLEAN_PATH, "NANOCHAT_BASE_DIR": str(base)}
    if "PIP_FIND_LINKS" in os.environ:  # a machine's local wheel folder, as .ci/setup would find it
        env["PIP_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    done = subprocess.run(["bash", "--noprofile", "--norc", "-c", main_job], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=40 * 60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = list((base / "runs").glob("*/report.md"))
    assert len(reports) == 1, reports
    run = reports[0].parent
    for stage in DEFAULT_STAGES:
        assert (run / stage / "summary.json").is_file(), stage
    chat = json.loads((run / "chat_eval_sft" / "summary.json").read_text())
    assert chat["assistant_end_rate"] >= 0.9, chat  # the embedded chat model learned to end its turns
