"""Optional faster paths (e.g. chunked cross-entropy), each with a pure-PyTorch reference."""
