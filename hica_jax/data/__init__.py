"""Data sets, builders and input pipelines."""
