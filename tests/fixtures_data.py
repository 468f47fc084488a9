"""Fixtures for preprocessed data: real shards from the sample video (owned by the preprocess work)."""
