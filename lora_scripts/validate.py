"""`lora-scripts validate`: check config files and report every problem, as text or GitHub annotations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_scripts.config import Config, Problem, read_config, validate_file
from lora_scripts.errors import UserError

CONFIG_SUFFIXES = (".yaml", ".yml")


def find_configs(paths: list[str]) -> list[Path]:
    """Expand folders into the YAML files they hold, each file once; a named file is taken whatever its suffix."""
    found: list[Path] = []
    for raw in paths or ["configs"]:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{raw}: no such file or folder", exit_code=2)
    return list(dict.fromkeys(found))


def check_paths(path: Path) -> list[Problem]:
    """Problems with what a valid config points to: data folder, metadata, dataset, base model."""
    values, marks, _ = read_config(path)
    config = Config(values, path.resolve())
    problems = []

    def problem(key: str, message: str) -> None:
        line, column = marks.get(key, (1, 1))
        problems.append(Problem(str(path), line, column, key, message))

    data_dir = config.path("train_data_dir")
    if data_dir is not None and not data_dir.exists():
        problem("train_data_dir", f"data folder not found: {config.values['train_data_dir']}")
    metadata = config.path("metadata_path")
    if metadata is not None and not metadata.is_file():
        problem("metadata_path", f"metadata file not found: {config.values['metadata_path']}")
    if not problems and data_dir is not None:
        for message in _dataset_errors(config, data_dir):
            problem("train_data_dir", message)
    base_problem = _base_model_problem(config)
    if base_problem:
        problem("base_model", base_problem)
    return sorted(problems, key=lambda p: (p.line, p.column))


def _dataset_errors(config: Config, root: Path) -> list[str]:
    """The errors training would stop on before its first step: image checks, or reading the JSONL records."""
    if config.mode == "image":
        from lora_scripts.data.check import dataset_errors

        return dataset_errors(config)
    from lora_scripts.data.text import read_records, split_records

    try:
        split_records(read_records(root), config.validation_split, config.seed)
    except UserError as err:
        return [str(err)]
    return []


def _base_model_problem(config: Config) -> str:
    """Why training could not find ``base_model`` (empty when it can): a missing path, or a Hub id not in the cache."""
    value = config.values["base_model"]
    location = config.base_model_location()
    if Path(location).is_absolute():
        return "" if Path(location).exists() else f"base model not found: {value}"
    from lora_scripts.model.hub_cache import LOCAL_BASE_MODEL, cached_snapshot

    try:
        cached_snapshot(location, "base_model", LOCAL_BASE_MODEL[config.mode])
    except UserError as err:
        as_path = config.source.parent / value
        hub = str(err).removeprefix("base_model: ")  # the Problem names the key
        return f"{hub}; as a path (relative to the config's folder) it is {as_path}, which does not exist"
    return ""


def github_annotation(problem: Problem, level: str = "error", title: str = "") -> str:
    """A GitHub Actions workflow command that shows ``problem`` on the pull-request diff."""

    def escape(text: str, prop: bool = False) -> str:
        text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        return text.replace(":", "%3A").replace(",", "%2C") if prop else text

    props = f"file={escape(problem.path, True)},line={problem.line},col={problem.column}"
    title = title or f"config {problem.key}"
    return f"::{level} {props},title={escape(title, True)}::{escape(problem.message)}"


def main(args: argparse.Namespace) -> int:
    files = find_configs(args.paths)
    if not files:
        raise UserError(f"no .yaml config files in {', '.join(args.paths or ['configs'])}", exit_code=2)
    bad = 0
    for path in files:
        problems = validate_file(path)
        if not problems and args.check_paths:
            problems = check_paths(path)
        bad += bool(problems)
        for problem in problems:
            print(github_annotation(problem) if args.format == "github" else problem.text())
    summary = f"{len(files) - bad} of {len(files)} config(s) valid"
    print(summary, file=sys.stderr)
    return 1 if bad else 0
