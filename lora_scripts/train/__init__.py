"""Training: one loop (accelerate, checkpoints, resume, logging) driving a per-mode task."""
