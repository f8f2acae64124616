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
    """Problems with the files a valid config points to (data folder, metadata, base model)."""
    values, marks, _ = read_config(path)
    config = Config(values, path.resolve())
    problems = []

    def missing(key: str, what: str) -> None:
        line, column = marks.get(key, (1, 1))
        problems.append(Problem(str(path), line, column, key, f"{what} not found: {config.values[key]}"))

    data_dir = config.path("train_data_dir")
    if data_dir is not None and not data_dir.exists():
        missing("train_data_dir", "data folder")
    metadata = config.path("metadata_path")
    if metadata is not None and not metadata.is_file():
        missing("metadata_path", "metadata file")
    base = config.base_model_location()
    if Path(base).is_absolute() and not Path(base).exists():
        missing("base_model", "base model")
    if not problems and data_dir is not None and config.mode == "image":
        problems += _dataset_problems(config, marks, path)
    return problems


def _dataset_problems(config: Config, marks: dict[str, tuple[int, int]], path: Path) -> list[Problem]:
    from lora_scripts.data.check import dataset_errors

    line, column = marks.get("train_data_dir", (1, 1))
    return [Problem(str(path), line, column, "train_data_dir", message) for message in dataset_errors(config)]


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
