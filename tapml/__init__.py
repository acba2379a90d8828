"""tapml: carve unit tests from real model runs and bring the model to new platforms, top-down."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See `tapml.api.load`: a ready-to-generate Engine for a model name, GGUF or artifact."""
    from .api import load as _load

    return _load(*args, **kwargs)
