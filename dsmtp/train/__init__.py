"""The training loop, its schedules, metrics and checkpoints."""
