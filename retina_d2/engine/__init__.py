from .trainer import LesionTrainer, setup_cfg  # noqa: F401
