"""Exact, scriptable bridges between metatensor TensorMaps and e3nn irreps tensors."""

from ._to_irreps import TensorMapToIrreps
from ._to_tensor_map import IrrepsToTensorMap

__all__ = ["IrrepsToTensorMap", "TensorMapToIrreps"]
__version__ = "0.1.0"
