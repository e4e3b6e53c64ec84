# retina_d2 must be imported before anything from Detectron2: it bridges Detectron2 0.6 to
# today's NumPy/Pillow and to a missing detectron2._C (see retina_d2/compat.py).
import retina_d2  # noqa: F401
