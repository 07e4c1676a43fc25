"""The model family, one file each over shared layers (layers.py). Every model's
forward(tokens, positions, k_cache, v_cache) is the artifact's calling convention
(docs/artifact-format.md), and export_metadata() gives its architecture fields."""
from .babygpt import BabyGPT, GPTConfig
from .llama import Llama, LlamaConfig
from .llama1 import Llama1, Llama1Config
from .lora import LoRAConfig, add_lora, merge_lora
from .ngram import Bigram, BigramConfig, NGram, NGramConfig

# name -> (model class, config class). babygpt-lora is a BabyGPT with adapters (lora.py).
MODELS = {
    "bigram": (Bigram, BigramConfig),
    "ngram": (NGram, NGramConfig),
    "babygpt": (BabyGPT, GPTConfig),
    "babygpt-lora": (BabyGPT, GPTConfig),
    "llama1": (Llama1, Llama1Config),
    "llama2": (Llama, LlamaConfig),
}
