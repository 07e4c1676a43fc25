"""babyrt's training stage: models, tokenizers, data and the trainer (installed as babyrt.training)."""
