"""Helpers the tests share: real nats-server processes, databases and API servers."""
