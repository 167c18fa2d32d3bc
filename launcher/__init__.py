"""Binds lm/ to the world: Hydra composes config, Ray schedules workers, W&B receives metrics."""
