"""Training: runtime choices, optimizers and schedules, the training loop with its evaluation loop, checkpoint
retention and logging sinks, resume, distributed runs and time budgets (the checkpoint format is
:mod:`resnetlab.checkpoint`)."""
