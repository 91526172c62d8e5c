"""kNN and the linear probe on frozen features: tensors in, typed metrics out, no I/O."""
