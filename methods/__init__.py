"""Protection methods. Importing the package fills the registry; nothing is loaded at import time."""

# each registers its method, in this order
from . import encoder, vae, cw, facelock, noise, editshield, diffusion, facecloak  # noqa: F401, I001
from .base import Attack, PGDAttack, frozen
from .registry import METHODS, create, describe, get_method

__all__ = ["Attack", "PGDAttack", "frozen", "METHODS", "create", "describe", "get_method"]
