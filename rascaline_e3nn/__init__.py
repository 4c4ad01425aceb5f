"""Exact, scriptable bridges between metatensor TensorMaps and e3nn irreps tensors."""

from . import _fused
from ._fused import library_path
from ._to_irreps import TensorMapToIrreps
from ._to_tensor_map import IrrepsToTensorMap

# register the fused operators now, so that scripted modules using them load
_fused.load()

__all__ = ["IrrepsToTensorMap", "TensorMapToIrreps", "library_path"]
__version__ = "0.1.0"
