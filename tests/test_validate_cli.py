"""`lora-scripts validate` as a user runs it: a fresh process, exit codes, output formats, no traceback, no torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, fake_hub_cache, run_cli

CORPUS = Path(__file__).with_name("broken_configs")
MINIMAL = "train_data_dir: data\nbase_model: model\noutput_dir: out\n"
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")
GOOD_RECORDS = {"train.jsonl": '{"text": "hello"}\n'}


def hub_cache(root: Path, *repo_ids: str) -> dict[str, str]:
    """The environment of an offline Hugging Face cache at ``root`` holding a snapshot of each of ``repo_ids``."""
    fake_hub_cache(root, dict.fromkeys(repo_ids))
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def text_config(root: Path, base_model: str, data: dict[str, str]) -> Path:
    """configs/run.yaml under ``root``: text mode on ``root``/data holding the JSONL files ``data`` (name: text)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, text in data.items():
        (root / "data" / name).write_text(text, encoding="utf-8")
    config = root / "configs" / "run.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(
        f"mode: text\ntrain_data_dir: ../data\nbase_model: {base_model}\noutput_dir: ../out\n", encoding="utf-8"
    )
    return config


def imported_modules(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """The exit code of `lora-scripts ARGS` run in a fresh interpreter, and the modules it imported."""
    script = (
        "import json, sys\n"
        "from lora_scripts.cli import main\n"
        f"code = main({args!r})\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True, text=True, timeout=60
    )
    code, modules = json.loads(result.stdout.splitlines()[-1])
    return code, set(modules)


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
    code, modules = imported_modules(["validate", "configs", "tests/broken_configs"])
    assert code == 1 and {"lora_scripts.validate", "jsonschema", "yaml"} <= modules
    assert not {name.split(".")[0] for name in modules} & set(HEAVY)
    assert "huggingface_hub" not in modules, "only --check-paths looks at the Hub cache"


def test_check_paths_imports_no_heavy_library(tmp_path: Path) -> None:
    """Reading JSONL records and looking up a Hub id in the cache stay torch-free too."""
    config = text_config(tmp_path, "org/cached-model", GOOD_RECORDS)
    env = hub_cache(tmp_path / "hub", "org/cached-model")
    code, modules = imported_modules(["validate", "--check-paths", str(config)], env=env)
    assert code == 0 and {"lora_scripts.data.text", "lora_scripts.model.hub_cache", "huggingface_hub"} <= modules
    assert not {name.split(".")[0] for name in modules} & set(HEAVY)


def test_check_paths_finds_a_base_model_that_is_neither_a_path_nor_cached(tmp_path: Path) -> None:
    env = hub_cache(tmp_path / "hub", "org/cached-model")
    for base_model in ("models/Stable-diffusion/sd15", "nobody/not-cached-model"):
        config = text_config(tmp_path, base_model, GOOD_RECORDS)
        result = run_cli("validate", "--check-paths", str(config), env=env)
        assert result.returncode == 1, base_model
        as_path = config.parent / base_model
        assert result.stdout.startswith(f"{config}:3:1: error: base_model: '{base_model}' is ")
        assert result.stdout.endswith(
            f"; as a path (relative to the config's folder) it is {as_path}, which does not exist\n"
        )
        assert "Traceback" not in result.stderr
    assert (
        "'nobody/not-cached-model' is not in the local Hugging Face cache; download it first "
        "('hf download nobody/not-cached-model') or point it at a local folder;"
    ) in result.stdout

    (tmp_path / "configs" / "models" / "sd15").mkdir(parents=True)
    for base_model in ("models/sd15", "org/cached-model"):
        result = run_cli("validate", "--check-paths", str(text_config(tmp_path, base_model, GOOD_RECORDS)), env=env)
        assert result.returncode == 0, result.stdout + result.stderr


def test_check_paths_reads_the_text_records_as_training_does(tmp_path: Path) -> None:
    (tmp_path / "configs" / "model").mkdir(parents=True)
    records = {"mixed.jsonl": '{"text": "a"}\n{"prompt": "b", "completion": "c"}\n', "notes.jsonl": "hello\n"}
    config = text_config(tmp_path, "./model", records)
    result = run_cli("validate", "--check-paths", str(config))
    data = tmp_path / "data"
    assert result.returncode == 1
    assert result.stdout == (
        f"{config}:2:1: error: train_data_dir: {data / 'mixed.jsonl'}:2: a prompt/completion line in a file of "
        f"text lines (line 1); use one format per file; {data / 'notes.jsonl'}:1: not valid JSON "
        "(Expecting value at column 1)\n"
    )
    (data / "mixed.jsonl").unlink()
    (data / "notes.jsonl").unlink()
    config = text_config(tmp_path, "./model", GOOD_RECORDS)
    assert run_cli("validate", "--check-paths", str(config)).returncode == 0
    config.write_text(config.read_text(encoding="utf-8") + "validation_split: 0.5\n", encoding="utf-8")
    result = run_cli("validate", "--check-paths", str(config))
    assert result.returncode == 1 and "validation_split 0.5 of 1 example(s) leaves nothing to train on" in result.stdout


def test_job_summary_without_a_configs_folder_is_a_table_not_a_traceback(tmp_path: Path) -> None:
    script = str(REPO / "ci" / "validate_summary.py")
    result = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines()[-1] == "| (configs: no such file or folder) | | |"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(MINIMAL, encoding="utf-8")
    result = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "| `configs/run.yaml` | ✅ valid |  |"


def test_help_lists_the_options() -> None:
    result = run_cli("validate", "--help")
    assert result.returncode == 0
    assert "--format" in result.stdout and "--check-paths" in result.stdout
