from .launch import launch  # noqa: F401
from .trainer import LesionTrainer, setup_cfg  # noqa: F401
