"""Fixtures for the synthetic world: generated, served on 127.0.0.1 and ingested."""
