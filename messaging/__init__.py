"""Everything between PostgreSQL and RabbitMQ: the events that cross it (events.py), the broker
topology and moving queues onto new arguments (queue_migration.py), the outbox and its relay,
publisher confirms, broker connections, and the worker-side intake that rejects what Celery cannot run.

It imports no other app of the project: chat writes outbox rows through it, and the apps that
consume events (analytics, deadletters, monitoring) read its topology and events. The modules
settings import (topology, events) load no Django models.
"""
