"""Patch specs, their boxes as a pure function of (seed, image, patch), crop-and-resize, aggregation."""
