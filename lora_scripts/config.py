"""Training configs: read a flat YAML file, check it against the JSON Schema, fill in defaults.

The schema (``lora-config.schema.json``) is the single place where a key is declared: its type,
range, default and description. This module only adds what JSON Schema cannot say about YAML:
duplicate keys, line numbers, and reading values the way a person meant them (``2e-4`` is a
number even though YAML 1.1 says string; ``mixed_precision: no`` is the string "no", not false).
Torch is never imported here: ``lora-scripts validate`` must stay fast.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_scripts.errors import UserError

SCHEMA_NAME = "lora-config.schema.json"
PATH_KEYS = ("train_data_dir", "metadata_path", "output_dir", "logging_dir", "resume_from", "init_lora_weights")
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_YAML_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located as precisely as the YAML allows."""

    path: str
    line: int
    column: int
    key: str
    message: str

    def text(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: error: {self.key}: {self.message}"


def schema_path() -> Path:
    """The schema file: inside the installed package, or in the repository's schemas/ folder."""
    packaged = Path(__file__).with_name(SCHEMA_NAME)
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[1] / "schemas" / SCHEMA_NAME


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(schema_path().read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def defaults() -> dict[str, Any]:
    return {key: spec["default"] for key, spec in schema()["properties"].items() if "default" in spec}


class Config:
    """A validated config: every schema key is an attribute, defaults filled in.

    ``source`` is the YAML file it came from; relative paths are resolved against its folder
    with :meth:`path`.
    """

    def __init__(self, values: dict[str, Any], source: Path) -> None:
        self.values = {**defaults(), **values}
        self.source = source
        if not self.values.get("logging_dir"):
            self.values["logging_dir"] = str(Path(self.values["output_dir"]) / "logs")

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def path(self, key: str) -> Path | None:
        """The value of a path key resolved against the config's folder; None when empty."""
        value = self.values.get(key) or ""
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.source.parent / path).resolve()

    def base_model_location(self) -> str:
        """``base_model`` as a resolved path when it names a file or folder, else the Hub id as given."""
        value = self.values["base_model"]
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.source.parent / path
        looks_like_path = value.startswith((".", "/", "~")) or path.exists() or value.endswith((".safetensors", ".ckpt"))
        return str(path.resolve()) if looks_like_path else value

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed (used for smoke overrides and tests)."""
        return Config({**self.values, **changes}, self.source)


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, int]], list[Problem]]:
    """Parse ``path`` into raw values, the (line, column) of each key, and any problems found.

    Never raises for bad content: every problem becomes a :class:`Problem`.
    """
    path = Path(path)
    shown = str(path)

    def problem(message: str, key: str = "(file)", line: int = 1, column: int = 1) -> list[Problem]:
        return [Problem(shown, line, column, key, message)]

    try:
        data = path.read_bytes()
    except OSError as err:
        return {}, {}, problem(f"cannot read file: {err.strerror or err}")
    if b"\x00" in data:
        return {}, {}, problem("not a YAML text file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return {}, {}, problem(f"not UTF-8 text (bad byte at offset {err.start})")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = err.problem or err.context or "invalid YAML"
        if "'\\t'" in reason:
            reason = "a tab character is not allowed in YAML indentation; use spaces"
        return {}, {}, problem(f"YAML syntax error: {reason}", "(yaml)", line, column)
    except yaml.YAMLError as err:
        return {}, {}, problem(f"YAML error: {err}", "(yaml)")
    if node is None:
        return {}, {}, problem("file is empty: expected 'key: value' lines such as 'base_model: ...'")
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        return {}, {}, problem(f"the top level is {kind}; expected 'key: value' lines", "(file)", line, column)

    constructor = yaml.SafeLoader("")
    values: dict[str, Any] = {}
    marks: dict[str, tuple[int, int]] = {}
    problems: list[Problem] = []
    properties = schema()["properties"]
    for key_node, value_node in node.value:
        line, column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
        if not isinstance(key_node, yaml.ScalarNode):
            problems += problem("keys must be plain names", "(key)", line, column)
            continue
        key = key_node.value
        if key in marks:
            first = marks[key][0]
            problems += problem(f"duplicate key (first set on line {first}); keep one", key, line, column)
            continue
        marks[key] = (line, column)
        try:
            value = constructor.construct_object(value_node, deep=True)
        except yaml.YAMLError as err:
            problems += problem(f"cannot read value: {err}", key, line, column)
            continue
        values[key] = _as_meant(value, value_node, properties.get(key, {}))
    return values, marks, problems


def _as_meant(value: Any, node: yaml.Node, spec: dict[str, Any]) -> Any:
    """Read a YAML 1.1 scalar the way the schema says it is meant."""
    types = spec.get("type")
    types = types if isinstance(types, list) else [types]
    plain = isinstance(node, yaml.ScalarNode) and node.style is None
    if "string" in types and plain and value is not None and not isinstance(value, str):
        return node.value  # mixed_precision: no -> "no"; trigger_word: 1990 -> "1990"
    if "number" in types and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)  # learning_rate: 2e-4 (a string to YAML 1.1)
    return value


def check_values(values: dict[str, Any], marks: dict[str, tuple[int, int]], shown: str) -> list[Problem]:
    """Check parsed values against the schema; one :class:`Problem` per fault, in file order."""
    properties = schema()["properties"]
    problems = []
    for error in _validator().iter_errors(values):
        if error.validator == "additionalProperties":
            for key in sorted(set(error.instance) - set(properties), key=lambda k: marks.get(k, (0, 0))):
                problems.append(_problem(shown, marks, key, f"unknown key{_did_you_mean(key, properties)}"))
            continue
        if error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            key = missing[0] if missing else "(file)"
            what = properties.get(key, {}).get("description", "").split(".")[0].lower()
            problems.append(Problem(shown, 1, 1, key, f"required key is missing: add '{key}: ...' ({what})"))
            continue
        key = str(error.absolute_path[0]) if error.absolute_path else "(file)"
        problems.append(_problem(shown, marks, key, _explain(error, properties.get(key, {}))))
    return sorted(problems, key=lambda p: (p.line, p.column))


def _problem(shown: str, marks: dict[str, tuple[int, int]], key: str, message: str) -> Problem:
    line, column = marks.get(key, (1, 1))
    return Problem(shown, line, column, key, message)


def _explain(error: Any, spec: dict[str, Any]) -> str:
    value = error.instance
    shown = f"{value!r}" if not isinstance(value, bool) else str(value).lower()
    if value is None:
        shown = "nothing (null)"
    rule = error.validator
    if rule == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        where = f"item {error.absolute_path[1] + 1}: " if len(error.absolute_path) > 1 else ""
        got = "" if value is None else f" ({_YAML_TYPES.get(type(value), type(value).__name__)})"
        return f"{where}got {shown}{got}; expected {_article(str(wanted))}"
    if rule == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{shown} is not allowed; use one of: {allowed}{_did_you_mean(str(value), error.validator_value)}"
    if rule in ("minimum", "exclusiveMinimum"):
        return f"{shown} is too small; must be {'at least' if rule == 'minimum' else 'more than'} {error.validator_value}"
    if rule in ("maximum", "exclusiveMaximum"):
        return f"{shown} is too large; must be {'at most' if rule == 'maximum' else 'less than'} {error.validator_value}"
    if rule == "multipleOf":
        return f"{shown} must be a multiple of {error.validator_value}"
    if rule in ("minLength", "minItems"):
        return f"{shown} is empty; {spec.get('description', 'a value is needed')}"
    if rule == "pattern":
        return f"{shown} is not valid here; {spec.get('description', '')}"
    return f"{shown}: {error.message}"


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _did_you_mean(word: str, choices: Any) -> str:
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f"; did you mean '{lowered[word.lower()]}'?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def validate_file(path: str | Path) -> list[Problem]:
    """All problems of one config file (empty when valid)."""
    values, marks, problems = read_config(path)
    if problems:
        return problems
    return check_values(values, marks, str(path))


def load_config(path: str | Path) -> Config:
    """Load a config for training; raises :class:`UserError` naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    problems = validate_file(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run 'lora-scripts validate {path}')" if len(problems) > 1 else ""
        raise UserError(problems[0].text() + more)
    values, _, _ = read_config(path)
    return Config(values, path.resolve())
