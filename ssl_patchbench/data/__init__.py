"""Datasets as uint8 images with labels: torchvision built-ins, ImageFolder trees, scikit-learn digits."""
