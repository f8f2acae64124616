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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_scripts.errors import UserError
from lora_scripts.model.hub_cache import names_a_path

SCHEMA_NAME = "lora-config.schema.json"
PATH_KEYS = ("train_data_dir", "metadata_path", "output_dir", "logging_dir", "resume_from", "init_lora_weights")
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "bool", "int", "float", "timestamp")}
_CONSTRUCTOR_ERRORS = (ValueError, LookupError, AttributeError, TypeError, OverflowError, RecursionError)
_YAML_WORDS = {
    "a flow sequence": "a [...] list",
    "a flow mapping": "a {...} mapping",
    "a quoted scalar": "a quoted text",
}
_SCHEMA_WORDS = {"array": "list", "object": "mapping"}
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
        return str(path.resolve()) if names_a_path(value) or path.exists() else value

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
        node = _compose(text)
    except yaml.MarkedYAMLError as err:
        mark = err.context_mark if _ends_early(err) else err.problem_mark or err.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return {}, {}, problem(f"YAML syntax error: {_yaml_reason(err)}", "(yaml)", line, column)
    except yaml.YAMLError as err:
        return {}, {}, problem(f"YAML error: {err}", "(yaml)")
    except RecursionError:
        return {}, {}, problem("YAML nested too deeply; a config is flat 'key: value' lines", "(yaml)")
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
        if isinstance(value_node, yaml.SequenceNode):
            for index, item in enumerate(value_node.value):
                marks[f"{key}[{index}]"] = (item.start_mark.line + 1, item.start_mark.column + 1)
        try:
            values[key] = _read_value(constructor, value_node, properties.get(key, {}))
        except yaml.MarkedYAMLError as err:
            problems += problem(f"cannot read value: {_yaml_reason(err)}", key, line, column)
        except _CONSTRUCTOR_ERRORS as err:  # PyYAML raises these for malformed tagged or dated scalars
            text = repr(value_node.value) if isinstance(value_node, yaml.ScalarNode) else "the value"
            reason = "nested too deeply" if isinstance(err, RecursionError) else err
            problems += problem(f"cannot read {text}: {reason}", key, line, column)
    return values, marks, problems


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree of ``text``: libyaml's fast parser when present; PyYAML's for the clearer errors."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass  # parse again below: the pure-Python parser's messages and positions are the ones we explain
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _yaml_reason(err: yaml.MarkedYAMLError) -> str:
    """One line saying what is wrong, in words for people who do not know YAML's grammar."""
    reason = err.problem or err.context or "invalid YAML"
    if "'\\t'" in reason:
        return "a tab character is not allowed in YAML indentation; use spaces"
    if "another document" in f"{err.context} {err.problem}" or "single document" in reason:
        return "more than one YAML document ('---'); a config is a single document"
    if _ends_early(err) and err.context:
        opened = err.context.removeprefix("while parsing ").removeprefix("while scanning ")
        opened = _YAML_WORDS.get(opened, opened)
        return f"the file ends inside {opened} that starts here; is a closing quote or bracket missing?"
    if "mapping values are not allowed" in reason:
        return "unexpected ':' (indented line, or a value containing ': ' that needs quotes)"
    return reason


def _ends_early(err: yaml.MarkedYAMLError) -> bool:
    return err.context_mark is not None and any(end in (err.problem or "") for end in ("end of stream", "<stream end>"))


def _read_value(constructor: yaml.SafeLoader, node: yaml.Node, spec: dict[str, Any]) -> Any:
    """Read a YAML 1.1 value the way the schema says it is meant."""
    types = spec.get("type")
    types = types if isinstance(types, list) else [types]
    plain = isinstance(node, yaml.ScalarNode) and not node.style  # None from PyYAML, "" from libyaml
    if "string" in types and plain and node.tag in _PLAIN_TAGS:
        return node.value  # mixed_precision: no -> "no"; trigger_word: 1990 -> "1990"
    if "array" in types and isinstance(node, yaml.SequenceNode):
        return [_read_value(constructor, item, spec.get("items", {})) for item in node.value]
    value = constructor.construct_object(node, deep=True)
    if "number" in types and plain and isinstance(value, str) and _FLOAT_TEXT.match(value):
        return float(value)  # learning_rate: 2e-4 (a string to YAML 1.1); quoted, it stays one, like batch_size: "4"
    if "integer" in types and isinstance(value, float) and value.is_integer():
        return int(value)  # lora_rank: 8.0 -> 8
    return value


def check_values(values: dict[str, Any], marks: dict[str, tuple[int, int]], shown: str) -> list[Problem]:
    """Check parsed values against the schema; one :class:`Problem` per faulty key, in file order."""
    properties = schema()["properties"]
    problems: dict[str, Problem] = {}
    for error in _validator().iter_errors(values):
        if error.validator == "additionalProperties":
            for key in set(error.instance) - set(properties):
                problems[key] = _problem(shown, marks, key, f"unknown key{_did_you_mean(key, properties)}")
        elif error.validator == "required":
            for key in re.findall(r"'([^']+)' is a required property", error.message):
                about = _first_sentence(properties.get(key, {}).get("description", ""))
                problems[key] = Problem(shown, 1, 1, key, f"required key is missing: add '{key}: ...' ({about})")
        elif error.absolute_path:
            key = str(error.absolute_path[0])
            index = error.absolute_path[1] if len(error.absolute_path) > 1 else None
            place = key if index is None else f"{key}[{index}]"
            problems.setdefault(key, _problem(shown, marks, place, _explain(error, properties.get(key, {}), index)))
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value) and key not in problems:
            problems[key] = _problem(shown, marks, key, f"{_show(value)} is not a finite number")
    return sorted(problems.values(), key=lambda p: (p.line, p.column))


def _problem(shown: str, marks: dict[str, tuple[int, int]], place: str, message: str) -> Problem:
    """A problem at ``place`` (a key, or ``key[index]`` for a list item), named by its key."""
    key = place.split("[")[0]
    line, column = marks.get(place, marks.get(key, (1, 1)))
    return Problem(shown, line, column, key, message)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[a-z)])\.(\s|$)", text, maxsplit=1)[0]


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, not as Python prints it."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, float) and not math.isfinite(value):
        return {"inf": ".inf", "-inf": "-.inf"}.get(str(value), ".nan")
    text = f"'{value}'" if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(error: Any, spec: dict[str, Any], index: int | None) -> str:
    """What is wrong with one value, what was given and what is allowed."""
    value, rule, limit = error.instance, error.validator, error.validator_value
    where = "" if index is None else f"item {index + 1}: "
    shown = _show(value)
    if rule == "type":
        wanted = " or ".join(_SCHEMA_WORDS.get(t, t) for t in (limit if isinstance(limit, list) else [limit]))
        got = "" if value is None or isinstance(value, dict) else f" ({_YAML_TYPES.get(type(value), 'a date')})"
        message = f"{where}got {shown}{got}; expected {_article(str(wanted))}"
        if value is None and index is None and "default" in spec:
            message += f"; leave the key out to use the default ({_show(spec['default'])})"
        elif isinstance(value, str) and _quoted_means(value, wanted):
            message += f"; write {value.strip()} without quotes"
        return message
    if rule == "enum":
        allowed = ", ".join(str(v) for v in limit)
        return f"{where}{shown} is not allowed; use one of: {allowed}{_did_you_mean(str(value), limit)}"
    if rule in ("minimum", "exclusiveMinimum"):
        return f"{where}{shown} is too small; must be {'at least' if rule == 'minimum' else 'more than'} {limit}"
    if rule in ("maximum", "exclusiveMaximum"):
        return f"{where}{shown} is too large; must be {'at most' if rule == 'maximum' else 'less than'} {limit}"
    if rule == "multipleOf":
        below = int(value // limit * limit)
        return f"{where}{shown} must be a multiple of {limit} (e.g. {max(below, limit)} or {below + limit})"
    if rule in ("minLength", "minItems"):
        wanted = _first_sentence(spec.get("description", "a value"))
        return f"{where}{shown} is empty; expected {wanted[:1].lower()}{wanted[1:]}"
    if rule == "pattern":
        example = f"; for example '{spec['examples'][0]}'" if spec.get("examples") else ""
        return f"{where}{shown} is not valid here: {_first_sentence(spec.get('description', ''))}{example}"
    return f"{where}{shown}: {error.message}"


def _quoted_means(text: str, wanted: str) -> bool:
    """Whether a quoted string would have been right without its quotes."""
    if "boolean" in wanted:
        return text.strip().lower() in ("true", "false")
    if "integer" in wanted:
        return text.strip().lstrip("+-").isdigit()
    return "number" in wanted and bool(_FLOAT_TEXT.match(text.strip()))


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _did_you_mean(word: str, choices: Any) -> str:
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f"; did you mean '{lowered[word.lower()]}'?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _checked(path: Path) -> tuple[dict[str, Any], list[Problem]]:
    """The values of ``path`` and every problem found reading or checking them."""
    values, marks, problems = read_config(path)
    if any(p.key in ("(file)", "(yaml)") for p in problems):
        return values, problems  # nothing was read: schema checks would only add noise
    unreadable = {p.key for p in problems}
    checked = [p for p in check_values(values, marks, str(path)) if p.key not in unreadable]
    return values, sorted(problems + checked, key=lambda p: (p.line, p.column))


def validate_file(path: str | Path) -> list[Problem]:
    """All problems of one config file (empty when valid)."""
    return _checked(Path(path))[1]


def load_config(path: str | Path) -> Config:
    """Load a config for training; raises :class:`UserError` naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    values, problems = _checked(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run 'lora-scripts validate {path}')" if len(problems) > 1 else ""
        raise UserError(problems[0].text() + more)
    return Config(values, path.resolve())
