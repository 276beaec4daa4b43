"""lora-entrypoint: serve one base LLM plus hot-swapped LoRA adapters, configured like NIM."""

__version__ = "0.1.0"
