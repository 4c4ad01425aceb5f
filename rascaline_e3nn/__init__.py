"""Exact, scriptable bridges between metatensor TensorMaps and e3nn irreps tensors,
and featomic's LODE spherical expansion in PyTorch."""

from ._lode import LodeSphericalExpansion, LodeToIrreps
from ._to_irreps import TensorMapToIrreps
from ._to_tensor_map import IrrepsToTensorMap

__all__ = ["IrrepsToTensorMap", "LodeSphericalExpansion", "LodeToIrreps", "TensorMapToIrreps"]
__version__ = "0.1.0"
