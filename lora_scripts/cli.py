"""The `lora-scripts` command line: argument parsing and dispatch, nothing else.

Each subcommand names the function that runs it as "module:function"; the module is imported
only when that subcommand runs, so `lora-scripts validate` never imports torch. A
:class:`~lora_scripts.errors.UserError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from lora_scripts import __version__
from lora_scripts.errors import UserError

Handler = str  # "package.module:function"; the function takes the parsed args and returns an exit code


def _config_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, metavar="YAML", help="training config file")


def _validate(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("paths", nargs="*", metavar="PATH", help="config files or folders (default: configs/)")
    p.add_argument(
        "--format",
        choices=["text", "github"],
        default="text",
        help="'github' prints ::error annotations for pull-request diffs",
    )
    p.add_argument(
        "--check-paths", action="store_true", help="also check that the data folder, metadata file and base model exist"
    )
    return "lora_scripts.validate:main"


def _train(p: argparse.ArgumentParser) -> Handler:
    _config_arg(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    return "lora_scripts.train.run:main"


def _smoke(p: argparse.ArgumentParser) -> Handler:
    _config_arg(p, required=False)
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="where the mock model, dummy data and outputs go (default: a fresh temporary folder)",
    )
    p.add_argument("--steps", type=int, default=5, help="training steps (default: 5)")
    return "lora_scripts.smoke:main"


def _mock_model(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("out", metavar="OUT", help="folder to write the model into")
    p.add_argument("--kind", choices=["sd", "causal-lm"], default="sd", help="Stable Diffusion 1.x or causal LM")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny", help="model size (default: tiny)")
    p.add_argument(
        "--family",
        choices=["sd1", "sd2"],
        default="sd1",
        help="Stable Diffusion layout: sd1 (CLIP, epsilon) or sd2 (OpenCLIP, v-prediction)",
    )
    return "lora_scripts.model.mock:main"


def _dummy_data(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("out", metavar="OUT", help="folder to write the dataset into")
    p.add_argument("--kind", choices=["image", "text"], default="image")
    p.add_argument("--count", type=int, default=8, help="number of examples (default: 8)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    return "lora_scripts.data.dummy:main"


def _label(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("dir", metavar="DIR", help="image folder")
    p.add_argument("--labels", nargs="+", required=True, help="candidate labels, or one file with a label per line")
    p.add_argument("--top-k", type=int, default=1, help="labels joined into each caption (default: 1)")
    p.add_argument("--trigger-word", default="", help="prefix for every caption")
    p.add_argument("--model", default="openai/clip-vit-base-patch32", help="local CLIP folder or Hub id")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overwrite", action="store_true", help="replace existing captions")
    return "lora_scripts.data.label:main"


def _data_check(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("dir", metavar="DIR", help="image folder")
    p.add_argument("--metadata", metavar="FILE", help="captions file (default: found in DIR)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default: 512)")
    p.add_argument("--bucket", action="store_true", help="show the aspect-ratio bucket of each image")
    p.add_argument("--format", choices=["text", "github"], default="text")
    return "lora_scripts.data.check:main"


def _preflight(p: argparse.ArgumentParser) -> Handler:
    _config_arg(p)
    p.add_argument("--measure", type=int, default=0, metavar="N", help="also run N real steps and time them")
    p.add_argument(
        "--require-gpu", action="store_true", help="fail when no CUDA GPU is usable (release jobs: no silent CPU run)"
    )
    return "lora_scripts.preflight:main"


def _publish(p: argparse.ArgumentParser) -> Handler:
    _config_arg(p)
    p.add_argument("--version", dest="release_version", default="", help="tag for the Hub revision, e.g. v1.2")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    return "lora_scripts.publish.hub:main"


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "validate": ("check config files against the schema", _validate),
    "train": ("train a LoRA from a config", _train),
    "smoke": ("train a few steps on a mock model and check the result", _smoke),
    "mock-model": ("write a small random-weight base model", _mock_model),
    "dummy-data": ("write a small generated dataset", _dummy_data),
    "label": ("caption images with CLIP zero-shot labels", _label),
    "preflight": ("estimate GPU memory and time before training", _preflight),
    "publish": ("push a trained LoRA to the Hugging Face Hub", _publish),
}
GROUPS: dict[str, tuple[str, dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]]]] = {
    "data": ("dataset tools", {"check": ("lint a dataset folder", _data_check)}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-scripts", description="LoRA fine-tuning from flat YAML configs.")
    parser.add_argument("--version", action="version", version=f"lora-scripts {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, define) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(handler=define(p))
    for group, (summary, commands) in GROUPS.items():
        g = sub.add_parser(group, help=summary, description=summary)
        gsub = g.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
        for name, (sub_summary, define) in commands.items():
            p = gsub.add_parser(name, help=sub_summary, description=sub_summary)
            p.set_defaults(handler=define(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library chatter (deprecation notes, "loading weights" bars) drowns our own progress; users may override.
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft still asks transformers 5.23+ for `is_gradient_checkpointing`, which warns on every run.
    warnings.filterwarnings("ignore", message=r"`\w+` is deprecated and will be removed in v6", category=FutureWarning)
    module_name, function_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a folder we may not write, a file gone mid-run: name it, no traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
