"""Hub ids resolve through the local Hugging Face cache only: a run never downloads a base model."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.errors import UserError

# What else ``base_model`` may name in each mode, for the message when a Hub id is not cached.
LOCAL_BASE_MODEL = {"image": "a local folder or .safetensors file", "text": "a local folder"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def names_a_path(location: str) -> bool:
    """Whether a ``base_model`` value is written as a path, not a Hub id: it starts with ``.``, ``/`` or ``~``,
    or names a checkpoint file. Such a value is never looked up in the Hub cache, even when nothing is there."""
    return location.startswith((".", "/", "~")) or location.lower().endswith(CHECKPOINT_SUFFIXES)


def cached_snapshot(repo_id: str, where: str, instead: str = LOCAL_BASE_MODEL["text"]) -> Path:
    """The cached snapshot folder of ``repo_id``; a UserError saying what to download when it is not cached.

    ``where`` names the file and key (or flag) at fault; ``instead`` says what else the user may point it at.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise UserError(f"{where}: '{repo_id}' is neither an existing path nor a Hub id") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{where}: '{repo_id}' is not in the local Hugging Face cache; download it first "
            f"('hf download {repo_id}') or point it at {instead}"
        ) from None
