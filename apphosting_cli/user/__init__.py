"""The user command line of `apphosting`: deploy and operate deployments through the API."""

from apphosting_cli.user.app import COMMANDS, EXIT_CODES, app

__all__ = ["COMMANDS", "EXIT_CODES", "app"]
