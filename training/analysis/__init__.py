"""Interpretability and cost analysis of trained LLaMA checkpoints (see __main__.py)."""
