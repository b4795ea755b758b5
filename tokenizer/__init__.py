"""Tokenizers: training the Chinese sentencepiece model, merging it into LLaMA's, and the
files other tools (Hugging Face, llama.cpp) need to read the result.

This package imports nothing else of zhllama.
"""
