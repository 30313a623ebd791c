"""The run directory on disk: atomic files, locks, records, score tensors, the manifest."""
