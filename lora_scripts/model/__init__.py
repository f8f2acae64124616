"""Base models: loading Stable Diffusion and causal LMs, and building random-weight mock models."""
