"""The extensions of the paper's bypass as variant objects the layer dispatches to (``layer.MoEBypass``)."""
from .key_routing import KeyRouter
from .scope import ScopeVariant, Selection

__all__ = ["KeyRouter", "ScopeVariant", "Selection"]
