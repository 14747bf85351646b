"""smg: the Shepherd Model Gateway in Python."""

__version__ = "0.1.0"
