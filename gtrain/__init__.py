"""gtrain: train grouped-convolution image classifiers (ResNeXt, HorNet) from recipes."""

from gtrain.version import __version__

__all__ = ["Classifier", "__version__"]


def __getattr__(name: str):
    # `from gtrain import Classifier` without importing torch for every `gtrain` command.
    if name == "Classifier":
        from gtrain.predict import Classifier

        return Classifier
    raise AttributeError(f"module 'gtrain' has no attribute {name!r}")
