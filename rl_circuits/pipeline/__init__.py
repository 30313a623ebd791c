"""The stages of a run, their registry, the integrity of a run's results, shards and Ray."""
