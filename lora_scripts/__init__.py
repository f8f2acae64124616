"""lora-scripts: LoRA fine-tuning for Stable Diffusion and causal LMs, driven by flat YAML configs."""

__version__ = "0.1.0"
