"""The user command line of `apphosting`: deploy and operate deployments through the API."""

from apphosting_cli.exits import EXIT_CODES
from apphosting_cli.user.app import COMMANDS, app

__all__ = ["COMMANDS", "EXIT_CODES", "app"]
