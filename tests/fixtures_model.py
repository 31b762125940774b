"""Fixtures for tiny models and tokenizers."""
