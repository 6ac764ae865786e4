"""The token index layout and the token-file format: shards, manifest, statistics, batches."""
