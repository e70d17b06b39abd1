"""What the exit codes of the user commands mean: in the help of both parsers, and light to import, so
that a server process (which builds the other parser) does not load the user commands' Typer app."""

from __future__ import annotations

EXIT_CODES = (
    "Exit codes: 0 the operation ended as asked (running; stopped for stop; gone for delete); "
    "1 it failed (failed or error, rolled back) or the API refused it; 2 invalid input (the violated fields "
    "are listed); 3 --timeout passed before it ended."
)
