"""pserver.benchmark: the `pserver bench` command, its scenarios and baselines."""
