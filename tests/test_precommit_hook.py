"""The config-validation pre-commit hook blocks a commit with a bad config and lets a good one through;
the yamllint hook accepts configs as the schema reads them and stays strict elsewhere.

Throwaway git repositories use the hooks exactly as .pre-commit-hooks.yaml / .pre-commit-config.yaml
define them, run with `language: system` from this environment so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_config import ISSUE_EXAMPLE

from conftest import REPO

GOOD = "train_data_dir: ../data\nbase_model: ../model\noutput_dir: ../output\n"


def hook(hook_id: str, config: str) -> dict:
    hooks = yaml.safe_load((REPO / config).read_text(encoding="utf-8"))
    if isinstance(hooks, dict):
        hooks = [h for repo in hooks["repos"] for h in repo["hooks"]]
    return next(h for h in hooks if h["id"] == hook_id)


def make_repo(tmp_path: Path, hooks: list[dict]) -> tuple[Path, dict[str, str]]:
    """A git repository with pre-commit installed, running ``hooks`` (local, from this environment)."""
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{"repo": "local", "hooks": hooks}]}))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    git(root, env, "init", "-q")
    subprocess.run([sys.executable, "-m", "pre_commit", "install"], cwd=root, env=env, check=True, capture_output=True)
    return root, env


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A repository with only the lora-config-validate hook, as .pre-commit-hooks.yaml ships it."""
    shipped = hook("lora-config-validate", ".pre-commit-hooks.yaml")
    local = {key: shipped[key] for key in ("id", "name", "entry", "files")} | {"language": "system"}
    return make_repo(tmp_path, [local])


def git(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_hook_blocks_a_bad_config_and_passes_a_good_one(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    config = root / "configs" / "style.yaml"
    config.write_text(GOOD + "learning_rate: 2e-4\noptimizer: adamw\n")
    git(root, env, "add", ".")
    blocked = git(root, env, "commit", "-m", "bad config")
    assert blocked.returncode != 0
    output = blocked.stdout + blocked.stderr
    assert "configs/style.yaml:5:1: error: optimizer: 'adamw' is not allowed" in output
    assert "did you mean 'AdamW'?" in output and "Traceback" not in output
    assert git(root, env, "rev-parse", "--verify", "HEAD").returncode != 0, "nothing may be committed"

    config.write_text(GOOD + "learning_rate: 2e-4\noptimizer: AdamW\n")
    git(root, env, "add", ".")
    committed = git(root, env, "commit", "-m", "good config")
    assert committed.returncode == 0, committed.stdout + committed.stderr
    assert "validate lora-scripts training configs" in committed.stdout + committed.stderr


def test_hook_ignores_yaml_outside_configs(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    (root / "notes.yaml").write_text("anything: [goes\n")
    git(root, env, "add", ".")
    assert git(root, env, "commit", "-m", "not a config").returncode == 0


def test_repo_hooks_are_local_and_offline() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    assert {repo["repo"] for repo in config["repos"]} == {"local"}
    ids = {h["id"] for repo in config["repos"] for h in repo["hooks"]}
    assert {"yamllint", "lora-config-validate", "github-workflows-schema", "ruff-check", "ruff-format"} <= ids
    assert hook("lora-config-validate", ".pre-commit-config.yaml")["entry"] == "lora-scripts validate"
    assert "vendor.github-workflows" in hook("github-workflows-schema", ".pre-commit-config.yaml")["entry"]


def test_yamllint_hook_lets_configs_say_no_but_keeps_workflows_strict(tmp_path: Path) -> None:
    """`mixed_precision: no` (the issue-2 example) is fine in configs/; `no` elsewhere still fails truthy."""
    root, env = make_repo(tmp_path, [hook("yamllint", ".pre-commit-config.yaml")])
    shutil.copy(REPO / ".yamllint", root / ".yamllint")
    (root / "configs" / "style.yaml").write_text(ISSUE_EXAMPLE)
    git(root, env, "add", ".yamllint", "configs")
    committed = git(root, env, "commit", "-m", "issue example")
    assert committed.returncode == 0, committed.stdout + committed.stderr

    workflow = root / ".github" / "workflows" / "ci.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text("on: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n    continue-on-error: no\n")
    git(root, env, "add", ".github")
    blocked = git(root, env, "commit", "-m", "workflow")
    output = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0
    assert "5:24" in output and "truthy value should be one of [false, true]" in output
