"""Publishing: model cards and pushing a finished run to the Hugging Face Hub."""
