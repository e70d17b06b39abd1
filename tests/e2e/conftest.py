"""The end-to-end tests use the pipeline fixtures of tests/support/stack.py."""

from tests.support.stack import FAST, Stack, eventually

__all__ = ["FAST", "Stack", "eventually"]
