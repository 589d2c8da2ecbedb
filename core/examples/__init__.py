"""Bundled examples that run on a CPU with no downloads."""
