"""Stable Diffusion 1.x / 2.x base models for image mode: finding, checking and loading them offline.

``base_model`` (as :meth:`Config.base_model_location` returns it) is one of:

- a diffusers folder (``model_index.json`` with unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a single-file checkpoint in the original LDM / A1111 layout (``.safetensors`` only: pickle files such as
  ``.ckpt`` / ``.pt`` are refused unread, never unpickled). The diffusers configs it needs ship in
  ``sd_configs/`` (``sd1``, ``sd2-v``, ``sd2-base``); the family is told from tensor shapes in the
  safetensors header (cross-attention width 768: SD 1.x, 1024: SD 2.x). SD 2.x 768-v and 512-base share
  one layout: an A1111-style sidecar ``<name>.yaml`` with ``parameterization: "v"`` decides, else a file
  name containing ``512`` or ``base`` means the epsilon 512 model and any other the v-prediction 768 one.
  A file whose safetensors metadata carries ``lora_scripts.diffusers_config`` (the mock model's, see
  :mod:`lora_scripts.model.mock_sd`) brings its own configs and tokenizer instead;
- a Hugging Face Hub id already in the local cache (nothing is downloaded).

The CLIP tokenizer of a single-file checkpoint is built from the CLIP BPE merges list
(``bpe_simple_vocab_16e6.txt.gz``) that the ``open_clip_torch`` or ``clip-anytorch`` packages ship (they are
read as data files, not imported, so ``pip install --no-deps open_clip_torch`` is enough), or else taken from
``openai/clip-vit-large-patch14`` in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from lora_scripts.errors import UserError
from lora_scripts.model.hub_cache import LOCAL_BASE_MODEL, cached_snapshot, names_a_path

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

CONFIGS = Path(__file__).with_name("sd_configs")
EMBEDDED_CONFIG_KEY = "lora_scripts.diffusers_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
WEIGHT_PARTS = ("unet", "vae", "text_encoder")  # the diffusers subfolders whose weights are loaded
UNET_PREFIX = "model.diffusion_model."
# A cross-attention key projection: its input width is the text encoder's hidden size.
CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# The UNet's cross-attention width (the text encoder's hidden size) tells the families apart.
SD_VERSION_BY_CONTEXT_WIDTH = {768: 1, 1024: 2}
CLIP_VOCAB_FILES = (("open_clip_torch", "open_clip"), ("clip-anytorch", "clip"))
CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its BPE list
START, END = "<|startoftext|>", "<|endoftext|>"
_MAX_HEADER = 100 * 1024 * 1024

# Training and sampling pipelines carry no safety checker (it would need weights we do not train or ship).
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that training and sampling use.

    ``vae`` and ``text_encoder`` are None once a training run that no longer needs them has freed them.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str


def load_sd_components(location: str, dtype: torch.dtype | None = None) -> SDComponents:
    """Load the model at ``location`` (folder, single ``.safetensors`` file or cached Hub id) in ``dtype``."""
    import torch

    dtype = dtype or torch.float32
    path = Path(location).expanduser()
    with _no_loading_bar():
        if path.is_dir():
            pipe = _load_folder(path, location, dtype)
        elif path.exists():
            pipe = _load_single_file(path, dtype)
        elif names_a_path(location):
            raise UserError(f"base_model: not found: {location}")
        else:
            pipe = _load_folder(cached_snapshot(location, "base_model", LOCAL_BASE_MODEL["image"]), location, dtype)
    return _components(pipe, location)


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Without diffusers' "Loading pipeline components" bar, which breaks into the training progress output."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def build_pipeline(components: SDComponents) -> StableDiffusionPipeline:
    """A sampling pipeline on the same modules (DDIM with the model's noise schedule; no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert components.vae is not None and components.text_encoder is not None, "sampling needs every model"
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        **NO_SAFETY_CHECKER,
    )


def write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]], pad_token: str = END) -> None:
    """Write a CLIPTokenizer (vocab.json, merges.txt, configs) for a byte-level BPE ``merges`` list into ``folder``.

    The vocabulary follows CLIP's construction: the 256 byte symbols, the same with the end-of-word
    marker ``</w>``, one token per merge in order, then the start and end tokens.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    tokenizer.save_pretrained(folder)


def _byte_symbols() -> list[str]:
    """One printable character per byte value, in CLIP's (and GPT-2's) order: printable bytes keep
    their own character, the others get consecutive code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def sd_version(context_width: int) -> int | None:
    """1 (SD 1.x) or 2 (SD 2.x) for a UNet whose cross-attention takes ``context_width`` features (its config's
    ``cross_attention_dim``); None for any other width, which is no Stable Diffusion family (e.g. the mock models)."""
    return SD_VERSION_BY_CONTEXT_WIDTH.get(context_width)


def _components(pipe: StableDiffusionPipeline, source: str) -> SDComponents:
    from diffusers import DDPMScheduler

    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return SDComponents(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        # SD never clips its predicted latents to [-1, 1]; DDPM's default does unless the config says otherwise.
        noise_scheduler=DDPMScheduler.from_config({"clip_sample": False, **pipe.scheduler.config}),
        source=source,
    )


def _load_folder(folder: Path, location: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise UserError(f"base_model: {location} has no model_index.json; expected a diffusers Stable Diffusion folder")
    pickled = [name for name in WEIGHT_PARTS if _has_only_pickle_weights(folder / name)]
    if pickled:
        raise UserError(
            f"base_model: {location} has {', '.join(pickled)} weights only as pickle files, which can run code "
            "when loaded and are never opened here; convert them to .safetensors (e.g. with a trusted converter)"
        )
    try:
        return StableDiffusionPipeline.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,  # never falls back to pickle (.bin) weights
            **NO_SAFETY_CHECKER,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"base_model: cannot load {location}: {_first_line(err)}") from None


def _has_only_pickle_weights(part: Path) -> bool:
    """Whether the diffusers subfolder ``part`` holds pickle weight files and no ``.safetensors`` ones."""
    suffixes = {file.suffix.lower() for file in part.iterdir()} if part.is_dir() else set()
    return bool(suffixes.intersection(PICKLE_SUFFIXES)) and ".safetensors" not in suffixes


def _load_single_file(path: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    with single_file_config(path) as config:
        try:
            return StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config),
                local_files_only=True,
                dtype=dtype,
                **NO_SAFETY_CHECKER,
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise UserError(f"base_model: cannot load {path}: {_first_line(err)}") from None


def _read_header(path: Path) -> tuple[dict[str, list[int]], str | None]:
    """Tensor shapes and the embedded diffusers config (if any) of ``path``, reading the header only.

    Refuses pickle files, files that are not safetensors, truncated files and checkpoints without
    a Stable Diffusion UNet.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: a little-endian u64 header length, then the JSON header. Its first byte can be 0x80 too.
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
    is_safetensors = 2 <= header_len <= min(path.stat().st_size - 8, _MAX_HEADER) and head[8:] == b"{"
    # Pickle protocols 2-5 open with 0x80 and the protocol number; torch.save's zip format with a zip header.
    looks_pickled = head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)
    if not is_safetensors and (looks_pickled or path.suffix.lower() in PICKLE_SUFFIXES):
        raise UserError(
            f"base_model: {path} is a pickle checkpoint, which can run code when loaded and is never opened here; "
            "convert it to .safetensors (e.g. with a trusted converter) and point base_model at that"
        )
    if path.suffix.lower() != ".safetensors" or not is_safetensors:
        raise UserError(f"base_model: {path} is not a .safetensors model file (expected a Stable Diffusion checkpoint)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
            meta = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UserError(f"base_model: {path} is damaged or truncated ({_first_line(err)}); download it again") from None
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise UserError(f"base_model: {path} holds no Stable Diffusion UNet weights (no '{UNET_PREFIX}*' tensors)")
    return shapes, meta.get(EMBEDDED_CONFIG_KEY)


@contextlib.contextmanager
def single_file_config(path: Path) -> Iterator[Path]:
    """A temporary diffusers config folder (configs and tokenizer, no weights) for the single-file checkpoint
    at ``path``: its embedded configs, or the shipped ones of its family. Reads the file's header only."""
    shapes, embedded = _read_header(path)
    with tempfile.TemporaryDirectory(prefix="lora-scripts-sd-config-") as tmp:
        folder = Path(tmp)
        if embedded is not None:
            _write_embedded(folder, embedded, path)
        else:
            family = _family(path, shapes)
            for source in (CONFIGS / family).rglob("*.json"):
                target = folder / source.relative_to(CONFIGS / family)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
            pad = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"]
            write_clip_tokenizer(folder / "tokenizer", _clip_merges(path), pad_token=pad)
        yield folder


def _write_embedded(folder: Path, embedded: str, path: Path) -> None:
    try:
        files = json.loads(embedded)
        if not isinstance(files, dict):
            raise ValueError("not a mapping")
        for name, text in files.items():
            target = (folder / name).resolve()
            if not target.is_relative_to(folder.resolve()) or not isinstance(text, str):
                raise ValueError(f"bad entry {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    except ValueError as err:
        raise UserError(f"base_model: {path}: unreadable '{EMBEDDED_CONFIG_KEY}' metadata ({err})") from None


def _family(path: Path, shapes: dict[str, list[int]]) -> str:
    """``sd1``, ``sd2-v`` or ``sd2-base`` from the checkpoint's tensor shapes (and, for SD 2.x, its name)."""
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        raise UserError(f"base_model: {path} is an SDXL checkpoint; only Stable Diffusion 1.x and 2.x are supported")
    context = shapes.get(CONTEXT_KEY, [0, 0])[-1]
    version = sd_version(context)
    if version == 1:
        return "sd1"
    if version == 2:
        return "sd2-v" if _is_v_prediction(path) else "sd2-base"
    raise UserError(
        f"base_model: {path}: unknown model family (cross-attention width {context or 'missing'}; "
        "SD 1.x has 768, SD 2.x 1024)"
    )


def _is_v_prediction(path: Path) -> bool:
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            original = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
            return original["model"]["params"].get("parameterization", "eps") == "v"
        except (yaml.YAMLError, KeyError, TypeError, AttributeError):
            raise UserError(f"{sidecar}: not an LDM model config (expected model.params)") from None
    name = path.name.lower()
    return not ("512" in name or "base" in name)


def _clip_merges(path: Path) -> list[tuple[str, str]]:
    """CLIP's BPE merges from an installed package's data file, else from the Hugging Face cache."""
    for distribution, package in CLIP_VOCAB_FILES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            bpe = Path(str(metadata.distribution(distribution).locate_file(f"{package}/{CLIP_BPE_NAME}")))
            if bpe.is_file():
                lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
                return [_pair(line) for line in lines[1 : CLIP_MERGES + 1]]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = "openai/clip-vit-large-patch14"
    try:
        merges = Path(hf_hub_download(repo, "merges.txt", local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(
            f"base_model: loading {path} needs the CLIP tokenizer vocabulary, which is not installed: run "
            f"'pip install --no-deps open_clip_torch' or 'hf download {repo} merges.txt'"
        ) from None
    lines = merges.read_text(encoding="utf-8").split("\n")
    return [_pair(line) for line in lines[1:] if line.strip()]


def _pair(line: str) -> tuple[str, str]:
    first, second = line.split()
    return first, second


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
