"""Named configurations: a preset is data (model config overrides + train config overrides)."""

PRESETS = {
    # babyrt demo: a small char-level LLaMA 2 that trains in about two minutes on 2 CPU cores.
    "demo": {
        "model": {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "context_length": 128,
                  "multiple_of": 32, "dropout": 0.0},
        "train": {"batch_size": 24, "max_steps": 600, "learning_rate": 2e-3, "warmup_steps": 30,
                  "eval_interval": 150, "eval_iters": 10},
    },
    # The smallest useful model, for tests.
    "tiny": {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context_length": 32,
                  "multiple_of": 16},
        "train": {"batch_size": 8, "max_steps": 30, "learning_rate": 3e-3, "warmup_steps": 5,
                  "eval_interval": 10, "eval_iters": 2},
    },
}
