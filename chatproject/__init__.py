"""Configuration only: settings, URLs, ASGI, the Celery app and the web process launcher.

It wires the apps together and sits on top of the import graph (docs/architecture.md).
"""

# Loaded with Django so that `shared_task` and `app.autodiscover_tasks` bind to the project's app.
from chatproject.celery import app as celery_app

__all__ = ("celery_app",)
