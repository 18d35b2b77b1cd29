"""Fixtures of the fault tests: the relay's tests watch what it publishes through the broker tests'
probe queue (tests/broker/conftest.py)."""

from tests.broker.conftest import probe_queue, send_messages  # noqa: F401
