"""The installed version of graff."""

__version__ = "0.1.0"
