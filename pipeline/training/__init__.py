"""Training internals: data loading over the preprocessed files, the split, checkpoints and the training loop."""
