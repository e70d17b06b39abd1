"""The shared kernel of apphosting: API and bus messages, settings, and the domain facts every process shares."""

__version__ = "0.1.0"


class CannotStart(Exception):
    """A process cannot start as configured (a port already served, say); its message is the one line to show."""
