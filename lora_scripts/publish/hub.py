"""`lora-scripts publish`: push a finished output_dir to the Hugging Face Hub in one commit.

What goes up: the weight files, a generated model card (README.md), loss.png, the training summary
and the sample files; never checkpoint folders. The Hub revision is tagged with the release version.
Re-running is safe: unchanged files make no commit (huggingface_hub skips them) and an existing tag
on the same commit is left alone. The token comes from ``HF_TOKEN`` only and never appears in output;
``HF_ENDPOINT`` points the client at another Hub (the tests' loopback stand-in).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_scripts.config import Config, load_config
from lora_scripts.errors import UserError
from lora_scripts.publish import model_card

if TYPE_CHECKING:
    from huggingface_hub import HfApi

WEIGHT_FILES = (
    "pytorch_lora_weights.safetensors",
    "lora_weights.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
)
EXTRA_FILES = ("loss.png", "training_summary.json")
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".txt")
CARD_NAME = "README.md"


@dataclass(frozen=True)
class Upload:
    """One file of the commit: its local source (None for the generated model card) and its path on the Hub."""

    local: Path | None
    path_in_repo: str


def plan(config: Config) -> list[Upload]:
    """Every file that ``publish`` uploads for ``config``, model card last; raises UserError if no weights exist."""
    output_dir = config.path("output_dir")
    assert output_dir is not None  # required by the schema
    where = f"{config.source}: output_dir"
    if not output_dir.is_dir():
        raise UserError(f"{where}: folder {output_dir} does not exist; train first (lora-scripts train)")
    uploads = [Upload(output_dir / name, name) for name in WEIGHT_FILES + EXTRA_FILES if (output_dir / name).is_file()]
    if not any(upload.path_in_repo in WEIGHT_FILES for upload in uploads):
        raise UserError(f"{where}: no weight files in {output_dir} (expected one of: {', '.join(WEIGHT_FILES)})")
    samples = output_dir / "samples"
    if samples.is_dir():
        uploads += [
            Upload(path, path.relative_to(output_dir).as_posix())
            for path in sorted(samples.rglob("*"))
            if path.is_file() and path.suffix.lower() in SAMPLE_SUFFIXES
        ]
    return [*uploads, Upload(None, CARD_NAME)]


def _token() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("HF_TOKEN is not set: export a Hugging Face token with write access (never put it in a config)")
    return token


def _hub_error(err: Exception, repo_id: str, token: str) -> UserError:
    """A one-line error for a failed Hub request, with the token scrubbed from anything the server echoed."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        message = f"the Hub rejected HF_TOKEN (401 Unauthorized) for {repo_id}: create a new token with write access"
    elif status == 403:
        message = f"HF_TOKEN may not write to {repo_id} (403 Forbidden): use a token with write access to its namespace"
    else:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        message = f"Hub request for {repo_id} failed: {first_line}"
    return UserError(message.replace(token, "***"))


def _commit_and_tag(api: HfApi, config: Config, uploads: list[Upload], version: str) -> tuple[str, bool, bool]:
    """Create the repo, commit the uploads and tag; return (commit id, committed?, tagged?)."""
    from huggingface_hub import CommitOperationAdd

    repo_id = config.hub_repo_id
    api.create_repo(repo_id, private=config.hub_private, exist_ok=True)
    head_before = api.repo_info(repo_id).sha
    output_dir = config.path("output_dir")
    assert output_dir is not None
    samples = [u.path_in_repo for u in uploads if u.path_in_repo.startswith("samples/")]
    card = model_card.render(config, output_dir, repo_id, samples, version).encode("utf-8")
    operations = [CommitOperationAdd(u.path_in_repo, str(u.local) if u.local else card) for u in uploads]
    message = f"Upload LoRA {version or ''} from {config.source.name}".replace("  ", " ")
    info = api.create_commit(repo_id, operations, commit_message=message)
    committed = info.oid != head_before
    tagged = False
    if version:
        existing = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
        if version not in existing:
            api.create_tag(repo_id, tag=version, revision=info.oid, tag_message=message)
            tagged = True
        elif existing[version] != info.oid:
            raise UserError(
                f"{config.source}: tag {version} already exists on {repo_id} at another commit "
                f"({existing[version][:12]}); publish under a new version"
            )
    return info.oid, committed, tagged


def publish(config: Config, version: str = "", dry_run: bool = False) -> int:
    """Publish ``config``'s output_dir to ``config.hub_repo_id``; print what happened (or would happen)."""
    repo_id = config.hub_repo_id
    if not repo_id:
        raise UserError(f"{config.source}: hub_repo_id: not set; add 'hub_repo_id: user/name' to publish")
    uploads = plan(config)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if dry_run:
        print(f"dry run: would upload to {endpoint}/{repo_id} ({'private' if config.hub_private else 'public'}):")
        for upload in uploads:
            print(f"  {upload.local if upload.local else '(generated model card)'} -> {upload.path_in_repo}")
        print(f"  tag: {version}" if version else "  no tag (no --version)")
        return 0
    token = _token()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        oid, committed, tagged = _commit_and_tag(api, config, uploads, version)
    except HfHubHTTPError as err:
        raise _hub_error(err, repo_id, token) from None
    except (OSError, _transport_error()) as err:  # connection refused, DNS failure, timeout
        raise UserError(f"cannot reach the Hub at {endpoint} to publish {repo_id}: {type(err).__name__}") from None
    print(
        f"{'committed' if committed else 'unchanged, no new commit:'} {len(uploads)} files to "
        f"{endpoint}/{repo_id} at {oid[:12]}"
    )
    if version:
        print(f"tag {version}: {'created' if tagged else 'already there'}")
    return 0


def _transport_error() -> type[Exception]:
    """The HTTP client's network-failure base class (huggingface_hub 2 uses httpx2, older ones httpx)."""
    try:
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError
    return TransportError


def main(args: argparse.Namespace) -> int:
    return publish(load_config(args.config), args.release_version, args.dry_run)
