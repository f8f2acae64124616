#!/usr/bin/env python3
"""Work out what a release trains: the config, the version and the config's output_dir.

A release tag ``<config-name>-v<version>`` names ``configs/<config-name>.yaml``; a manual run gives
the config name (or path) and the version as inputs. Reads RELEASE_TAG, or INPUT_CONFIG and
INPUT_VERSION, from the environment (never from the workflow text, so nothing user-controlled is
spliced into a shell); writes config=, version=, tag= and output_dir= to $GITHUB_OUTPUT (or stdout).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lora_scripts.config import load_config
from lora_scripts.errors import UserError

TAG = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)-v(?P<version>[0-9][0-9A-Za-z.+-]*)$")
VERSION = re.compile(r"^v?(?P<version>[0-9][0-9A-Za-z.+-]*)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def target(env: dict[str, str], configs: Path = Path("configs")) -> dict[str, str]:
    """The release's config path, version (``v1.2.0``), GitHub tag and output_dir; UserError when unclear.

    A config without ``hub_repo_id`` is refused here, before hours of training, not at the publish step.
    """
    tag = env.get("RELEASE_TAG", "")
    if tag:
        match = TAG.match(tag)
        if not match:
            raise UserError(f"release tag {tag!r} must look like <config-name>-v<version>, e.g. my-style-v1.0.0")
        name, version = match["name"], match["version"]
    else:
        name = Path(env.get("INPUT_CONFIG", "")).stem
        match = VERSION.match(env.get("INPUT_VERSION", ""))
        if not NAME.match(name) or not match:
            raise UserError("workflow inputs: config must name a file in configs/ and version must look like 1.2.0")
        version = match["version"]
        tag = f"{name}-v{version}"
    config = configs / f"{name}.yaml"
    if not config.is_file():
        raise UserError(f"{config}: no such config for release {tag}")
    loaded = load_config(config)
    if not loaded.hub_repo_id:
        raise UserError(
            f"{config}: hub_repo_id: empty; a release publishes to the Hub, so set it (e.g. your-name/{name})"
        )
    output_dir = loaded.path("output_dir")
    return {"config": str(config), "version": f"v{version}", "tag": tag, "output_dir": str(output_dir)}


def main() -> int:
    try:
        values = target(dict(os.environ))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lines = "".join(f"{key}={value}\n" for key, value in values.items())
    target_file = os.environ.get("GITHUB_OUTPUT")
    if target_file:
        with open(target_file, "a", encoding="utf-8") as handle:
            handle.write(lines)
    sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
