"""Importing this package registers retina_d2's backbones, meta-architectures and semantic heads."""
from . import backbone as _backbone  # noqa: F401  (registration)
from . import dilated_resnet as _dilated_resnet  # noqa: F401  (registration)
from . import encoders as _encoders  # noqa: F401  (registration)
from . import inception as _inception  # noqa: F401  (registration)
from . import meta_arch as _meta_arch  # noqa: F401  (registration)
from . import semantic as _semantic  # noqa: F401  (registration)
from .checkpoint import LesionCheckpointer  # noqa: F401
