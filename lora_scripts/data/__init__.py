"""Datasets: reading, checking and generating training data (images with captions, JSONL text)."""
