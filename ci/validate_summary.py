#!/usr/bin/env python3
"""Markdown table of every config and its validation status, for the pull-request job summary.

Usage: ci/validate_summary.py [PATH...]   (default configs/). Appends to $GITHUB_STEP_SUMMARY when
set, else prints. Always exits 0, also without configs to list (the table says why):
`lora-scripts validate` is the step that fails the job.
"""

from __future__ import annotations

import os
import sys

from lora_scripts.config import validate_file
from lora_scripts.errors import UserError
from lora_scripts.validate import find_configs


def table(paths: list[str]) -> str:
    try:
        configs, empty = find_configs(paths), "no configs found"
    except UserError as err:  # a named file or folder (default configs/) that does not exist
        configs, empty = [], str(err)
    lines = ["## Config validation", "", "| config | status | first problem |", "| --- | --- | --- |"]
    for config in configs:
        problems = validate_file(config)
        status = "valid" if not problems else f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        first = problems[0].text().split(": error: ", 1)[-1].replace("|", "\\|") if problems else ""
        lines.append(f"| `{config}` | {'✅' if not problems else '❌'} {status} | {first} |")
    if not configs:
        lines.append(f"| ({empty}) | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = table(argv)
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
