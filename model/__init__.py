"""The LLaMA model, its checkpoint formats and converters, and generation."""
