"""Data: pre-tokenized, memory-mapped token shards and the datasets that read them."""
