"""Data: task sources, splits, federated shards; the prepared splits read back (hash-verified)."""
