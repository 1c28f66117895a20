"""Samples to micro-batches: packing, mixture, sources, image decoding, the loader."""
