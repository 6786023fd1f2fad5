"""Pretraining: planning (plan), the training loop (trainer), checkpoints, torch.distributed and
hyperparameter search (hpo)."""
