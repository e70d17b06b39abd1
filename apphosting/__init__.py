"""The shared kernel of apphosting: API and bus messages, settings, and the command line."""

__version__ = "0.1.0"
