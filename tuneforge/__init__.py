"""tuneforge: a self-hosted Tinker — the Tinker HTTP protocol served by PyTorch, transformers and
PEFT on local hardware."""

__version__ = "0.1.0"
