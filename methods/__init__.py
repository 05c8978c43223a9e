"""Protection methods. Importing the package fills the registry; nothing is loaded at import time."""

from . import encoder, vae, cw, facelock, noise, facecloak  # noqa: F401, I001  (each registers its method, in this order)
from .base import Attack, PGDAttack, frozen
from .registry import METHODS, create, describe, get_method

__all__ = ["Attack", "PGDAttack", "frozen", "METHODS", "create", "describe", "get_method"]
