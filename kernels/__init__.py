"""Triton kernels for masked video pretraining, with torch reference twins.

Imports nothing else of ours (DESIGN §8).
"""
