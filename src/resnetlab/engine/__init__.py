"""Training: runtime choices, optimizers and schedules, the training loop, checkpoints and resume."""
