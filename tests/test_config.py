"""The config loader and the validate command, run in-process: values mean what the YAML says, every
broken config in tests/broken_configs/ is reported with its key or line and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lora_scripts import cli
from lora_scripts.config import Config, check_values, defaults, load_config, read_config, schema, validate_file
from lora_scripts.errors import UserError
from lora_scripts.validate import find_configs, github_annotation

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).with_name("broken_configs")
EXPECTED: dict[str, list[str]] = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../schemas/lora-config.schema.json"

ISSUE_EXAMPLE = """\
train_data_dir: ./data/style_train
metadata_path: ./data/style_train/metadata.csv
base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors
lora_rank: 8
lora_alpha: 16
lora_dropout: 0.1
batch_size: 4
epochs: 10
learning_rate: 2e-4
optimizer: AdamW
scheduler: cosine
output_dir: ./output/my_style_lora
save_steps: 100
logging_dir: ./output/my_style_lora/logs
mixed_precision: no
resolution: 512
conv_lora_rank: 4
num_workers: 1
max_train_steps: 5
"""
MINIMAL = "train_data_dir: data\nbase_model: model\noutput_dir: out\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`lora-scripts validate ARGS` through the real CLI entry point, in this process."""
    code = cli.main(["validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_issue_example_validates_and_means_what_it_says(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_EXAMPLE)
    assert validate_file(path) == []
    config = load_config(path)
    assert config.learning_rate == 0.0002 and isinstance(config.learning_rate, float)
    assert config.mixed_precision == "no"
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout, config.conv_lora_rank) == (8, 16, 0.1, 4)
    assert (config.batch_size, config.epochs, config.max_train_steps, config.save_steps) == (4, 10, 5, 100)
    assert (config.optimizer, config.scheduler, config.resolution, config.num_workers) == ("AdamW", "cosine", 512, 1)
    assert config.path("train_data_dir") == (tmp_path / "data" / "style_train").resolve()
    assert config.path("logging_dir") == (tmp_path / "output" / "my_style_lora" / "logs").resolve()
    assert config.base_model_location() == str(tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates_and_points_editors_at_the_schema(path: Path) -> None:
    assert validate_file(path) == []
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_LINE
    assert (path.parent / SCHEMA_LINE.split("=", 1)[1]).resolve() == REPO / "schemas" / "lora-config.schema.json"
    config = load_config(path)
    for key in ("train_data_dir", "output_dir"):
        assert config.path(key).is_relative_to(REPO), f"{key} must be relative to the config's folder"


def test_shipped_configs_cover_both_modes() -> None:
    assert {load_config(path).mode for path in SHIPPED} == {"image", "text"}


def test_corpus_is_complete() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.suffix == ".yaml"}
    assert len(files) >= 30
    assert files == set(EXPECTED), "every broken config needs an entry in expected.json and vice versa"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_config_is_reported_with_its_key_or_line(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = CORPUS / name
    code, out, err = validate(capsys, str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines and all(line.startswith(f"{path}:") and ": error: " in line for line in lines)
    for expected in EXPECTED[name]:
        assert expected in out, f"{name}: {expected!r} not in:\n{out}"
    assert "0 of 1 config(s) valid" in err
    with pytest.raises(UserError, match=r"^" + str(path).replace("\\", "\\\\") + r":\d+:\d+: error: "):
        load_config(path)


def test_yaml_1_1_surprises_are_read_as_meant(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + "learning_rate: 1E-3\nlora_rank: 8.0\nmixed_precision: no\ntrigger_word: 1990\n"
        + "license: 2024-01-01\nhub_private: no\nvalidation_prompts: [yes, '2e-4']\n",
    )
    config = load_config(path)
    assert config.learning_rate == 0.001
    assert config.lora_rank == 8 and isinstance(config.lora_rank, int)
    assert config.mixed_precision == "no"
    assert config.trigger_word == "1990"
    assert config.license == "2024-01-01"
    assert config.hub_private is False
    assert config.validation_prompts == ["yes", "2e-4"]


def test_every_problem_in_a_file_is_listed_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "lora_rnk: 4\nresolution: 500\noptimizer: adam\nlora_rank: 0\n")
    problems = validate_file(path)
    assert [(p.line, p.key) for p in problems] == [
        (4, "lora_rnk"),
        (5, "resolution"),
        (6, "optimizer"),
        (7, "lora_rank"),
    ]
    assert "did you mean 'AdamW'?" in problems[2].message
    with pytest.raises(UserError, match=r"lora_rnk: unknown key.*\(and 3 more; run 'lora-scripts validate"):
        load_config(path)


def test_a_mapping_value_gets_one_message_not_one_per_rule(tmp_path: Path) -> None:
    problems = validate_file(write(tmp_path, MINIMAL + "mode:\n  kind: image\n"))
    assert [p.text().split(": error: ")[1] for p in problems] == ["mode: got a mapping; expected a string"]


def test_defaults_fill_in_and_logging_dir_follows_output_dir(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    for key, value in defaults().items():
        if key != "logging_dir":
            assert getattr(config, key) == value
    assert config.path("logging_dir") == (tmp_path / "out" / "logs").resolve()
    assert (
        config.replace(lora_rank=2).lora_rank == 2
        and config.lora_rank == schema()["properties"]["lora_rank"]["default"]
    )


def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_schema_declares_every_key_fully() -> None:
    doc = schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["additionalProperties"] is False
    for key, spec in doc["properties"].items():
        assert spec.get("type"), key
        assert spec.get("description") and "\n" not in spec["description"], key
        assert ("default" in spec) != (key in doc["required"]), f"{key}: optional keys need a default"
        if "default" in spec:
            assert (
                check_values(
                    {"train_data_dir": "a", "base_model": "b", "output_dir": "c", key: spec["default"]}, {}, "x"
                )
                == []
            ), key


def test_issue_keys_are_in_the_schema() -> None:
    wanted = [
        "mode",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "seed",
        "warmup_steps",
        "min_snr_gamma",
        "noise_offset",
        "train_text_encoder",
        "cache_latents",
        "resume_from",
        "init_lora_weights",
        "validation_prompts",
        "sample_every_n_steps",
        "keep_checkpoints",
        "trigger_word",
        "target_modules",
        "max_seq_length",
        "validation_split",
        "hub_repo_id",
        "hub_private",
    ]
    assert set(wanted) <= set(schema()["properties"])


def test_read_config_locates_keys_and_list_items(tmp_path: Path) -> None:
    values, marks, problems = read_config(write(tmp_path, MINIMAL + "validation_prompts:\n  - a\n  - b\n"))
    assert problems == []
    assert values["validation_prompts"] == ["a", "b"]
    assert marks["output_dir"] == (3, 1) and marks["validation_prompts[1]"] == (6, 5)


def test_bom_and_windows_line_endings_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "windows.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.replace("\n", "\r\n").encode())
    assert validate_file(path) == []


def test_find_configs_expands_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.yaml", "sub/b.yml", "notes.txt"):
        (tmp_path / name).write_text(MINIMAL, encoding="utf-8")
    other = write(tmp_path, MINIMAL, "explicit.conf")
    assert find_configs([str(tmp_path), str(other)]) == [tmp_path / "a.yaml", tmp_path / "sub" / "b.yml", other]
    with pytest.raises(UserError) as caught:
        find_configs([str(tmp_path / "missing")])
    assert caught.value.exit_code == 2


def test_github_annotation_escapes_properties_and_message(tmp_path: Path) -> None:
    problem = validate_file(write(tmp_path, MINIMAL + "lora_rnk: 4\n", "a,b.yaml"))[0]
    line = github_annotation(problem)
    assert line.startswith("::error file=") and "a%2Cb.yaml,line=4,col=1,title=config lora_rnk::" in line
    assert line.endswith("::unknown key; did you mean 'lora_rank'?")


def test_validate_folder_exit_codes_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, MINIMAL, "good.yaml")
    assert validate(capsys, str(tmp_path))[0] == 0
    write(tmp_path, MINIMAL + "epochs: 0\n", "bad.yaml")
    code, out, err = validate(capsys, str(tmp_path))
    assert code == 1 and "bad.yaml:4:1: error: epochs: 0 is too small" in out and "good.yaml" not in out
    assert "1 of 2 config(s) valid" in err


def test_check_paths_names_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "train_data_dir: data\nbase_model: ./model.safetensors\noutput_dir: out\n")
    code, out, _ = validate(capsys, "--check-paths", str(path))
    assert code == 1
    assert ":1:1: error: train_data_dir: data folder not found: data" in out
    assert ":2:1: error: base_model: base model not found" in out
    assert validate(capsys, str(path))[0] == 0, "without --check-paths, paths are not looked at"


def test_config_is_plain_values(tmp_path: Path) -> None:
    config = Config({"train_data_dir": "d", "base_model": "org/model", "output_dir": "/abs/out"}, tmp_path / "c.yaml")
    assert config.base_model_location() == "org/model"
    assert config.path("output_dir") == Path("/abs/out")
    assert config.path("resume_from") is None
    with pytest.raises(AttributeError):
        _ = config.no_such_key
