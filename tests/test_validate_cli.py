"""`lora-scripts validate` as a user runs it: a fresh process, exit codes, output formats, no traceback, no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_cli

CORPUS = Path(__file__).with_name("broken_configs")
MINIMAL = "train_data_dir: data\nbase_model: model\noutput_dir: out\n"
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def test_default_folder_is_configs_and_it_is_valid() -> None:
    result = run_cli("validate")
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = len(list((REPO / "configs").glob("*.yaml")))
    assert result.stdout == "" and f"{shipped} of {shipped} config(s) valid" in result.stderr


def test_every_broken_config_fails_with_its_message_and_no_traceback() -> None:
    expected: dict[str, list[str]] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
    result = run_cli("validate", "tests/broken_configs")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert f"0 of {len(expected)} config(s) valid" in result.stderr
    for name, substrings in expected.items():
        lines = [line for line in result.stdout.splitlines() if line.startswith(f"tests/broken_configs/{name}:")]
        assert lines, f"{name} not reported"
        for substring in substrings:
            assert any(substring in line for line in lines), f"{name}: {substring!r} not in {lines}"
    assert all(
        re.match(r"^tests/broken_configs/[\w.-]+:\d+:\d+: error: \S+: ", line) for line in result.stdout.splitlines()
    )


def test_good_and_bad_files_in_one_run(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(MINIMAL, encoding="utf-8")
    (tmp_path / "bad.yml").write_text(MINIMAL + "lora_rnk: 4\n", encoding="utf-8")
    result = run_cli("validate", str(tmp_path / "good.yaml"), str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == f"{tmp_path / 'bad.yml'}:4:1: error: lora_rnk: unknown key; did you mean 'lora_rank'?\n"
    assert "1 of 2 config(s) valid" in result.stderr, "a file named twice is checked once"


def test_github_format_emits_annotations() -> None:
    result = run_cli("validate", "--format", "github", "tests/broken_configs/unknown-key-typo.yaml")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "::error file=tests/broken_configs/unknown-key-typo.yaml,line=4,col=1,title=config lora_rnk"
        "::unknown key; did you mean 'lora_rank'?"
    ]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        ([str(tmp_path / "missing.yaml")], "missing.yaml: no such file or folder"),
        ([str(tmp_path)], "no .yaml config files in"),
    ]:
        result = run_cli("validate", *args)
        assert result.returncode == 2, args
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_check_paths_against_the_config_folder(tmp_path: Path) -> None:
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text(
        "train_data_dir: ../data\nbase_model: ../model.safetensors\noutput_dir: ../out\n", encoding="utf-8"
    )
    result = run_cli("validate", "--check-paths", str(config), cwd=tmp_path.parent)
    assert result.returncode == 1
    assert f"{config}:1:1: error: train_data_dir: data folder not found: ../data" in result.stdout
    assert f"{config}:2:1: error: base_model: base model not found: ../model.safetensors" in result.stdout


def test_validate_imports_no_heavy_library() -> None:
    script = (
        "import json, sys\n"
        "from lora_scripts.cli import main\n"
        "code = main(['validate', 'configs', 'tests/broken_configs'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    code, modules = json.loads(result.stdout.splitlines()[-1])
    assert code == 1 and {"lora_scripts.validate", "jsonschema", "yaml"} <= set(modules)
    assert not {name.split(".")[0] for name in modules} & set(HEAVY)


def test_help_lists_the_options() -> None:
    result = run_cli("validate", "--help")
    assert result.returncode == 0
    assert "--format" in result.stdout and "--check-paths" in result.stdout
