"""megatron-ift: Intuitive Fine-Tuning (arXiv 2405.11870) on megatron-core GPT models."""

__version__ = "0.1.0"
