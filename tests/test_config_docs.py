"""docs/config-reference.md is generated from the schema and fails the suite when it is stale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

GENERATOR = REPO / "ci" / "gen_config_docs.py"
DOC = REPO / "docs" / "config-reference.md"
SCHEMA = REPO / "schemas" / "lora-config.schema.json"


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60)


def test_reference_is_up_to_date() -> None:
    result = generate("--check")
    assert result.returncode == 0, f"{result.stderr} (regenerate with: python ci/gen_config_docs.py)"


def test_every_key_has_a_row_with_its_default_and_range() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    rows = {line.split(" | ")[0].strip("| `"): line for line in DOC.read_text(encoding="utf-8").splitlines()}
    for key in schema["properties"]:
        assert key in rows, f"{key} missing from {DOC.name}"
        if key in schema["required"]:
            assert " | required | " in rows[key]
    assert "| `learning_rate` | number | `0.0001` | > 0; <= 10 |" in rows["learning_rate"]
    assert "64 to 4096; multiple of 8" in rows["resolution"]
    assert "`no`, `fp16`, `bf16`" in rows["mixed_precision"]


def test_check_fails_on_a_stale_document_and_regenerating_fixes_it(tmp_path: Path) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    schema["properties"]["lora_rank"]["default"] = 4
    changed = tmp_path / "schema.json"
    changed.write_text(json.dumps(schema), encoding="utf-8")
    doc = tmp_path / "reference.md"
    doc.write_text(DOC.read_text(encoding="utf-8"), encoding="utf-8")

    stale = generate("--check", "--schema", str(changed), "--output", str(doc))
    assert stale.returncode == 1 and "out of date" in stale.stderr and "gen_config_docs.py" in stale.stderr
    assert generate("--schema", str(changed), "--output", str(doc)).returncode == 0
    assert "| `lora_rank` | integer | `4` |" in doc.read_text(encoding="utf-8")
    assert generate("--check", "--schema", str(changed), "--output", str(doc)).returncode == 0
