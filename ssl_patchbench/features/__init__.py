"""Extraction (sampler + encoder + aggregation) and the memory-mapped, content-keyed, resumable feature stores."""
