"""The machine-learning library: model, tokenizer, data, trainer, checkpoints. No Ray, Hydra or W&B."""
