"""Checkpoints and models: loading Hugging Face checkpoints into TransformerLens, the registry of
model pairs, tiny random checkpoints for tests."""
