"""I²VICReg / TCR retraining on fixed-scale patches: config, augmentations, losses, LARS, resumable state."""
