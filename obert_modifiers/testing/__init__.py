"""Fixtures for tests and benchmarks (not used by the package itself): ``hub_fixtures`` makes small
model folders for the hub (most without torch; ``make_tiny_bert_folders`` imports torch)."""
