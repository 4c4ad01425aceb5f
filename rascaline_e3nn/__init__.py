"""Exact, scriptable bridges between metatensor TensorMaps and e3nn irreps tensors."""

from ._to_irreps import TensorMapToIrreps

__all__ = ["TensorMapToIrreps"]
__version__ = "0.1.0"
