"""The bottom floor: the user-error type, atomic file writes, the cache root, devices, ranks, run environment."""
