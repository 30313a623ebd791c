"""rl-circuits: edge attribution patching to compare a model before and after post-training."""
