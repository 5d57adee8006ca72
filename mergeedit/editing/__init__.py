"""Knowledge editing: edit records, datasets, prompts, R-SFT training and delta checkpoints."""
