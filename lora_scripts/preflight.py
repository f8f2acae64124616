"""`lora-scripts preflight`: will this config fit in memory, at which batch size, and how long will it take?

The estimate needs no weights: the base model is built from its config files on PyTorch's meta device
(shapes only), the LoRA layers are added the way training adds them, and one forward pass on meta
tensors records every tensor autograd keeps for the backward pass. The formula is in docs/preflight.md.
``--measure N`` runs N real steps through the training loop into a scratch folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.config import Config, load_config
from lora_scripts.errors import UserError
from lora_scripts.model.hub_cache import LOCAL_BASE_MODEL, cached_snapshot, names_a_path
from lora_scripts.train.task import weight_dtype

if TYPE_CHECKING:
    import torch

    from lora_scripts.data.text import Record

MIB = 2**20
GIB = 2**30
# Bytes of optimizer state per trainable parameter (fp32 states unless noted).
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Lion": 4, "SGD": 4, "Prodigy": 16}
CUDA_OVERHEAD = 600 * MIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
TEXT_ENCODER_TOKENS = 77


@dataclass
class Estimate:
    """Peak memory of one training step, in bytes, split by what uses it."""

    weight_bytes: int
    weight_params: int
    lora_params: int
    optimizer: str
    activation_fixed: int  # activations that do not grow with the batch
    activation_per_sample: int  # activations of one example at the config's resolution / sequence length
    batch_size: int
    overhead: int = 0

    @property
    def lora_bytes(self) -> int:
        """LoRA weights and gradients in fp32, plus the optimizer's state."""
        return self.lora_params * (4 + 4 + OPTIMIZER_STATE_BYTES[self.optimizer])

    def activations(self, batch_size: int, scale: float = 1.0) -> int:
        """Activations at ``batch_size``; ``scale`` multiplies the per-example size (resolution changes)."""
        return self.activation_fixed + int(self.activation_per_sample * scale * batch_size)

    def total(self, batch_size: int | None = None, scale: float = 1.0) -> int:
        batch = self.batch_size if batch_size is None else batch_size
        return self.weight_bytes + self.lora_bytes + self.activations(batch, scale) + self.overhead

    def largest_batch(self, free: int, scale: float = 1.0) -> int:
        """The largest batch size whose total fits in ``free`` bytes (0 when not even one example fits)."""
        room = free - self.total(0, scale)
        per_sample = max(1, int(self.activation_per_sample * scale))
        return max(0, room // per_sample)


# -- model structure on the meta device --------------------------------------------------------------------


@contextlib.contextmanager
def _sd_config_folder(location: str, where: str) -> Iterator[Path]:
    """The diffusers config folder of a Stable Diffusion base model: a local folder, the cached snapshot of a
    Hub id, or for a single ``.safetensors`` file the configs the loader would use (its header read only)."""
    from lora_scripts.model.stable_diffusion import single_file_config

    path = Path(location).expanduser()
    if path.is_file():
        with single_file_config(path) as folder:
            yield folder
        return
    if not path.exists():
        if names_a_path(location):
            raise UserError(f"{where}: not found: {location}")
        path = cached_snapshot(location, where, LOCAL_BASE_MODEL["image"])
    if not (path / "model_index.json").is_file():
        raise UserError(f"{where}: {path} has no model_index.json (expected a diffusers folder or a .safetensors file)")
    yield path


def _mark_lora_fp32(*modules: torch.nn.Module) -> None:
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def _meta_sd(config: Config) -> tuple[dict[str, torch.nn.Module], Callable[[int], list[torch.Tensor]]]:
    """The Stable Diffusion modules (meta device, with LoRA) and a function running one step's forward for a batch."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel

    from lora_scripts.export.diffusers_format import add_image_lora
    from lora_scripts.train.image_task import released_after_caching

    where = f"{config.source}: base_model"
    dtype = weight_dtype(config.mixed_precision)
    with _sd_config_folder(config.base_model_location(), where) as folder:
        try:
            with init_empty_weights():
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
                text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder / "text_encoder"))
        except (OSError, ValueError) as err:
            raise UserError(
                f"{where}: cannot read the model configs of {config.base_model_location()}: {str(err).splitlines()[0]}"
            ) from None
    released = released_after_caching(config)  # freed before the first step: not part of its peak
    modules = {
        name: module
        for name, module in {"unet": unet, "vae": vae, "text_encoder": text_encoder}.items()
        if name not in released
    }
    for module in modules.values():
        module.requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype)
    with init_empty_weights():
        add_image_lora(unet, text_encoder if config.train_text_encoder else None, config)
    _mark_lora_fp32(unet, text_encoder)
    side = config.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = getattr(text_encoder.config, "max_position_embeddings", TEXT_ENCODER_TOKENS)

    def step(batch: int) -> list[torch.Tensor]:
        latents = torch.zeros(batch, unet.config.in_channels, side, side, device="meta")
        if config.train_text_encoder:
            ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
            embeddings = text_encoder(ids)[0]
        else:
            embeddings = torch.zeros(batch, tokens, unet.config.cross_attention_dim, device="meta", dtype=dtype)
        timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
        prediction = unet(latents.to(dtype), timesteps, embeddings.to(dtype)).sample.float()
        return [torch.nn.functional.mse_loss(prediction, latents)]

    return modules, step


def _meta_lm(config: Config) -> tuple[dict[str, torch.nn.Module], Callable[[int], list[torch.Tensor]]]:
    """The causal LM (meta device, with LoRA) and a function running one step's forward for a batch."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_scripts.model.causal_lm import resolve_base_model, resolve_target_modules

    where = f"{config.source}: base_model"
    folder = resolve_base_model(config.base_model_location(), where)
    try:
        with init_empty_weights():
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
            base.requires_grad_(False).to(weight_dtype(config.mixed_precision))
            targets = resolve_target_modules(base, config.target_modules, f"{config.source}: target_modules")
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets)
            model = get_peft_model(base, lora, autocast_adapter_dtype=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{where}: cannot read the model config in {folder}: {str(err).splitlines()[0]}") from None

    def step(batch: int) -> list[torch.Tensor]:
        ids = torch.zeros(batch, config.max_seq_length, dtype=torch.long, device="meta")
        return [model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss]

    return {"model": model}, step


@contextlib.contextmanager
def _memory_efficient_attention() -> Iterator[None]:
    """Route scaled_dot_product_attention to the fused kernel, as training on a GPU (or CPU) does.

    On the meta device PyTorch would otherwise pick the unfused math path, which keeps the whole
    attention matrix for backward and overstates activation memory many times over. Also answers
    the models' "is this mask all ones?" checks, which meta tensors cannot.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Fused(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = dict(kwargs or {})
            if func in (torch.Tensor.__bool__, torch.Tensor.item) and args[0].is_meta:
                return True  # "is the mask all ones?": yes, the traced batch is full, unpadded sequences
            if func is not sdpa:
                return func(*args, **kwargs)
            options = dict(zip(("attn_mask", "dropout_p", "is_causal"), args[3:], strict=False)) | kwargs
            query, key, value = args[:3]
            if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernel wants equal head counts
                repeat = query.shape[-3] // key.shape[-3]
                key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
            return fused(
                query,
                key,
                value,
                options.get("dropout_p", 0.0),
                options.get("is_causal", False),
                attn_mask=options.get("attn_mask"),
                scale=options.get("scale"),
            )[0]

    with Fused():
        yield


class _SavedTensors:
    """Adds up the bytes of the tensors autograd keeps for the backward pass, each tensor once."""

    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}  # held, so ids stay unique; meta tensors cost nothing
        self.total = 0

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in self.tensors:
            self.tensors[id(tensor)] = tensor
            self.total += tensor.numel() * tensor.element_size()
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[_SavedTensors]:
        import torch

        with torch.autograd.graph.saved_tensors_hooks(self.add, lambda tensor: tensor):
            yield self


def _trace(step: Callable[[int], object], batch: int, segments: list[torch.nn.Module], checkpointed: bool) -> int:
    """Bytes saved for backward by one forward pass; with ``checkpointed``, plus what the checkpointed
    segments keep (their inputs); without, the result is the largest single segment's share."""
    import torch

    saved = _SavedTensors()
    starts: list[int] = []
    largest = 0

    def before(_module: torch.nn.Module, args: tuple) -> None:
        if checkpointed:
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    saved.add(arg)
        starts.append(saved.total)

    def after(*_: object) -> None:
        nonlocal largest
        largest = max(largest, saved.total - starts.pop())

    handles = [h for s in segments for h in (s.register_forward_pre_hook(before), s.register_forward_hook(after))]
    try:
        with _memory_efficient_attention(), saved.recording():
            step(batch)
    finally:
        for handle in handles:
            handle.remove()
    return saved.total if checkpointed or not segments else largest


def _checkpointed_segments(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Turn gradient checkpointing on (the way training does) and return the blocks it recomputes."""
    from lora_scripts.train.task import enable_gradient_checkpointing

    enable_gradient_checkpointing(module)
    return [m for m in module.modules() if m is not module and getattr(m, "gradient_checkpointing", False) is True]


def activation_bytes(
    modules: dict[str, torch.nn.Module], step: Callable[[int], object], batch: int, checkpointing: bool
) -> int:
    """Activation memory of one forward+backward at ``batch``: the tensors saved for backward.

    With gradient checkpointing: what the checkpointed pass keeps, plus the largest segment's
    activations, which exist again while that segment is recomputed during backward.
    """
    for module in modules.values():
        module.train()
    if not checkpointing:
        return _trace(step, batch, [], checkpointed=False)
    trained = [m for m in modules.values() if any(p.requires_grad for p in m.parameters())]
    segments = [s for m in trained for s in _checkpointed_segments(m)]
    kept = _trace(step, batch, segments, checkpointed=True)
    for segment in segments:
        segment.gradient_checkpointing = False
    try:
        return kept + _trace(step, batch, segments, checkpointed=False)
    finally:
        for segment in segments:
            segment.gradient_checkpointing = True


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate(config: Config, on_gpu: bool) -> Estimate:
    """The peak-memory estimate of ``config`` (see docs/preflight.md)."""
    modules, step = _meta_lm(config) if config.mode == "text" else _meta_sd(config)
    params = [p for module in modules.values() for p in module.parameters()]
    frozen = [p for p in params if not p.requires_grad]
    one = activation_bytes(modules, step, 1, config.gradient_checkpointing)
    two = activation_bytes(modules, step, 2, config.gradient_checkpointing)
    return Estimate(
        weight_bytes=_nbytes(frozen),
        weight_params=sum(p.numel() for p in frozen),
        lora_params=sum(p.numel() for p in params if p.requires_grad),
        optimizer=config.optimizer,
        activation_fixed=max(0, 2 * one - two),
        activation_per_sample=two - one,
        batch_size=config.batch_size,
        overhead=CUDA_OVERHEAD if on_gpu else 0,
    )


# -- free memory -------------------------------------------------------------------------------------------


@dataclass
class Device:
    """Where training would run and how much memory it has free."""

    kind: str  # "cuda" or "cpu"
    name: str
    free: int


def find_device() -> Device:
    """The GPU with the least free memory (through torch, else nvidia-smi), or the CPU's available RAM."""
    import torch

    if torch.cuda.is_available():
        free = [
            (torch.cuda.mem_get_info(i)[0], torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())
        ]
        least = min(free)
        return Device("cuda", f"{least[1]} ({len(free)} GPU{'s' if len(free) > 1 else ''})", least[0])
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"]
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            lines = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
            gpus = [(int(free) * MIB, name.strip()) for free, name in (line.split(",", 1) for line in lines if line)]
            if gpus:
                least = min(gpus)
                return Device("cuda", f"{least[1]} (nvidia-smi; this torch has no CUDA)", least[0])
    import psutil

    return Device("cpu", "CPU (no GPU found)", psutil.virtual_memory().available)


# -- report ------------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _freed_models(config: Config) -> str:
    from lora_scripts.train.image_task import released_after_caching

    names = {"vae": "VAE", "text_encoder": "text encoder"}
    freed = [names[name] for name in names if name in released_after_caching(config)]
    return f"; {' and '.join(freed)} freed after caching" if freed else ""


def report(config: Config, est: Estimate, device: Device) -> tuple[list[str], bool]:
    """The lines preflight prints and whether the config fits."""
    precision = {"no": "fp32"}.get(config.mixed_precision, config.mixed_precision)
    shape = f"{config.max_seq_length} tokens" if config.mode == "text" else f"{config.resolution}px"
    checkpointing = "on" if config.gradient_checkpointing else "off"
    lines = [
        f"preflight: {config.source}",
        f"  base model weights   {_size(est.weight_bytes):>12}  "
        f"({est.weight_params / 1e6:.1f}M parameters, {precision}{_freed_models(config)})",
        f"  {'LoRA + grads + ' + config.optimizer:<20} {_size(est.lora_bytes):>12}  "
        f"({est.lora_params / 1e6:.2f}M parameters)",
        f"  activations          {_size(est.activations(est.batch_size)):>12}  "
        f"(batch_size {est.batch_size}, {shape}, gradient checkpointing {checkpointing})",
    ]
    if est.overhead:
        lines.append(f"  {'CUDA context':<20} {_size(est.overhead):>12}")
    total = est.total()
    lines.append(f"  estimated peak       {_size(total):>12}")
    where = "GPU" if device.kind == "cuda" else "RAM"
    lines.append(f"  free {where:<15} {_size(device.free):>12}  on {device.name}")
    if device.kind == "cpu":
        lines.append("  no GPU: this would be a CPU run; compared with available RAM")
    fits = total <= device.free
    verdict = "fits" if fits else "does NOT fit"
    lines.append(f"verdict: {verdict} ({_size(abs(device.free - total))} {'to spare' if fits else 'short'})")
    lines += _suggestions(config, est, device.free)
    return lines, fits


def _suggestions(config: Config, est: Estimate, free: int) -> list[str]:
    batch = est.largest_batch(free)
    lines = [f"largest batch_size that fits: {min(batch, 1024)}" if batch else "largest batch_size that fits: none"]
    if config.mode == "image":
        fitting = [
            r for r in range(config.resolution, 63, -64) if est.largest_batch(free, (r / config.resolution) ** 2)
        ]
        best = next((r for r in fitting if est.largest_batch(free, (r / config.resolution) ** 2) >= est.batch_size), 0)
        if best:
            lines.append(f"largest resolution that fits at batch_size {est.batch_size}: {best}")
        elif fitting:
            lines.append(f"largest resolution that fits at batch_size 1: {fitting[0]}")
    if not batch and not config.gradient_checkpointing:
        lines.append("try gradient_checkpointing: true")
    if not batch and config.mixed_precision == "no":
        lines.append("try mixed_precision: bf16 (or fp16)")
    return lines


# -- measurement -------------------------------------------------------------------------------------------


def total_steps(config: Config) -> int:
    """Optimizer steps of the whole run (one process), as the training loop counts them."""
    if config.max_train_steps:
        return config.max_train_steps
    from lora_scripts.train.loop import GroupedBatchSampler, make_task

    task = make_task(config)
    task.check_data()
    groups = [list(range(_text_example_count(config, task.train_records)))] if config.mode == "text" else task.groups()
    batches = len(GroupedBatchSampler(groups, config.batch_size, config.seed))
    return config.epochs * max(1, math.ceil(batches / config.gradient_accumulation_steps))


def _text_example_count(config: Config, records: Sequence[Record]) -> int:
    """Training sequences of a text run: records tokenized, truncated and packed as training does (no model loaded)."""
    from lora_scripts.data.text import build_examples
    from lora_scripts.model.causal_lm import load_tokenizer, resolve_base_model

    where = f"{config.source}: base_model"
    tokenizer = load_tokenizer(resolve_base_model(config.base_model_location(), where), where)
    return len(build_examples(records, tokenizer, config.max_seq_length, config.packing))


def measure(config: Config, steps: int) -> dict[str, Any]:
    """Run ``steps`` real training steps into a scratch folder; step time, peak memory and the ETA."""
    from lora_scripts.train.logs import read_loss_csv
    from lora_scripts.train.loop import train

    run_steps = total_steps(config)
    with tempfile.TemporaryDirectory(prefix="lora-preflight-") as scratch:
        trial = config.replace(
            output_dir=scratch,
            logging_dir="",
            max_train_steps=steps,
            save_steps=0,
            resume_from="",
            validation_prompts=[],
            sample_every_n_steps=0,
            merge=False,
        )
        result = train(trial)
        elapsed = [float(row["elapsed"]) for row in read_loss_csv(Path(scratch) / "logs" / "loss.csv")]
    # The first step pays for warm-up (allocations, kernel selection): time the others when there are any.
    step_time = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else elapsed[0]
    return {
        "steps": result.steps,
        "step_time_s": step_time,
        "peak_memory": result.summary["peak_memory_mb"] * MIB,
        "device": result.summary["device"],
        "total_steps": run_steps,
        "eta_s": step_time * run_steps,
    }


def _no_cuda_reason(device: Device) -> str:
    import torch

    if device.kind == "cuda":  # nvidia-smi sees a GPU that torch cannot use
        return f"torch {torch.__version__} has no CUDA support but nvidia-smi lists {device.name.split(' (')[0]}"
    return f"no CUDA GPU found (neither torch {torch.__version__} nor nvidia-smi sees one)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def main(args: argparse.Namespace) -> int:
    import torch

    config = load_config(args.config)
    if args.measure < 0:
        raise UserError(f"--measure must be 0 or more steps, got {args.measure}", exit_code=2)
    device = find_device()
    if args.require_gpu and not torch.cuda.is_available():
        raise UserError(f"{config.source}: --require-gpu: {_no_cuda_reason(device)}; this job would train on the CPU")
    est = estimate(config, on_gpu=device.kind == "cuda")
    lines, fits = report(config, est, device)
    print("\n".join(lines))
    if args.measure and not fits:
        print(f"--measure {args.measure}: skipped, the config does not fit (fix the verdict first)")
    if args.measure and fits:
        measured = measure(config, args.measure)
        cpu = not torch.cuda.is_available()
        what = "peak RSS of this process" if cpu else "peak GPU memory allocated"
        print(f"measured over {measured['steps']} step(s) on {measured['device']}:")
        print(f"  step time            {measured['step_time_s']:.3f} s")
        print(f"  {what:<20} {_size(measured['peak_memory'])}")
        print(f"  ETA                  {_duration(measured['eta_s'])} for {measured['total_steps']} steps")
        if cpu:
            print("  (a CPU run: the step time and ETA are for this CPU, a GPU will be much faster)")
    return 0 if fits else 1
