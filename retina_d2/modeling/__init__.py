"""Importing this package registers retina_d2's backbones and meta-architectures."""
from . import backbone as _backbone  # noqa: F401  (registration)
from . import meta_arch as _meta_arch  # noqa: F401  (registration)
from .checkpoint import LesionCheckpointer  # noqa: F401
