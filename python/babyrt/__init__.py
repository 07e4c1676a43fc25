"""babyrt: a runtime for small language models.

    import babyrt
    model = babyrt.load("artifact_dir")            # C++ runtime, KV cache
    print(model.generate("Once upon a time", max_new_tokens=64, seed=0))
"""
import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _C
from ._C import ArgumentError, ArtifactError, DeviceError, Error, TokenizerError
from .runtime import Model, generate, load

__version__ = _C.version()

__all__ = ["Model", "load", "generate", "Error", "ArtifactError", "TokenizerError",
           "ArgumentError", "DeviceError", "__version__"]
