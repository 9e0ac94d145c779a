"""Data path: synthetic phantom, source adapters, ingest to WebDataset shards, DALI stream.

Imports nothing else of ours (README: What is where): the engine imports loaders, never the reverse.
"""
