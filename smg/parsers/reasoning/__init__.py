"""Reasoning parsers (registered in smg.parsers.registry)."""
