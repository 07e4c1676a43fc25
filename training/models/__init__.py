"""The model family. Each model is one file; forward(tokens, positions, k_cache, v_cache) is the
calling convention of the exported artifact (see docs/artifact-format.md)."""
from .llama import Llama, LlamaConfig

MODELS = {"llama2": (Llama, LlamaConfig)}
