"""Merging methods. Importing this package registers every method in :data:`METHODS`."""
from .registry import METHODS, Method, Param, alpha_param, get_method, register  # noqa: F401
from . import basic, svd, esm  # noqa: F401,E402  (registration side effect)
