"""Semantic lesion heads (``SEM_SEG_HEADS_REGISTRY``); importing the package registers them."""
from . import cbam_deeplab as _cbam_deeplab  # noqa: F401  (registration)
from . import lesion_net as _lesion_net  # noqa: F401  (registration)
from . import red_seg as _red_seg  # noqa: F401  (registration)
from . import resunet as _resunet  # noqa: F401  (registration)
from . import simple_fpn_head as _simple_fpn_head  # noqa: F401  (registration)
