"""Benchmarks of neumo's stages (``make bench``): each prints its figures and the ratios measured in the same run."""
