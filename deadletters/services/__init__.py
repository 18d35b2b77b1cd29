"""Writes of the dead-letter app, one module per topic.

- archive: what arrives on `dead_letters` becomes a DeadLetter row, once (the archiver).
- delivery_rows: how a delivery becomes that row (no queries).
- task_failures: why a task failed, recorded by the worker and joined to its letter.
- resolution: a person replays or discards letters (admin, `manage.py dlq`).
- retention: what the archive no longer needs is deleted (the archiver, hourly).
"""
