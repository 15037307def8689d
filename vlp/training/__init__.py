"""Training: schedules, optimizer, checkpoints, the contrastive task and the trainer loop."""
