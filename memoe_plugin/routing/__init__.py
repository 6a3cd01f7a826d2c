"""Routing inputs from token ids: entity extractors, knowledge anchors, the locality guard."""
