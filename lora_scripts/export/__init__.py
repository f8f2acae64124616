"""Weight export: the LoRA file formats that other tools load (diffusers/peft, kohya/A1111/ComfyUI)."""
