"""Allows `python -m lora_scripts`."""

from lora_scripts.cli import main

raise SystemExit(main())
