"""Tool-call parsers, one module per format family (registered in smg.parsers.registry)."""
