"""The evaluation harness: data files, records, metrics, memoe-compare and memoe-analyze.

Nothing in the method core imports this package; ``import memoe_plugin`` does not load it.
"""
