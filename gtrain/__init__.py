"""gtrain: train grouped-convolution image classifiers (ResNeXt, HorNet) from recipes."""

__version__ = "0.1.0"
