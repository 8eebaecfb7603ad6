"""gtrain: train grouped-convolution image classifiers (ResNeXt, HorNet) from recipes."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from gtrain import Classifier` without importing torch for every `gtrain` command.
    if name == "Classifier":
        from gtrain.predict import Classifier

        return Classifier
    raise AttributeError(f"module 'gtrain' has no attribute {name!r}")
