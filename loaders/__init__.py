"""Data path: synthetic phantom, source adapters, ingest to WebDataset shards, DALI stream.

Imports nothing else of ours (DESIGN §8): the engine imports loaders, never the reverse.
"""
