"""Fixtures of the fault tests: the relay's tests watch what it publishes through the broker tests'
probe queue, and the queue migration's run in a scratch vhost (tests/broker/conftest.py)."""

from tests.broker.conftest import probe_queue, scratch_broker_url, send_messages  # noqa: F401
