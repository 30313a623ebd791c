"""The `rl-circuits` command line and the demo."""
