"""The Celery app. Its settings are the CELERY_* names in chatproject/settings.py.

The queues and routes come from messaging/topology.py, which owns the topology; every worker
declares that topology when it connects, so a worker started before `setup_broker` still finds
the dead-letter exchange its queues name.
"""

from __future__ import annotations

import os

from celery import Celery, bootsteps

from chatproject.startup import settings_load_or_exit
from monitoring.worker_metrics import install_worker_metrics

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")

app = Celery("chatproject")
# Celery reads the Django settings when it first needs its configuration (parsing the command line
# already); a missing setting then ends the command with its one sentence, not a traceback.
app.on_configure.connect(lambda **_: settings_load_or_exit(), weak=False)
app.config_from_object("django.conf:settings", namespace="CELERY")
# Task metrics and the worker's /metrics endpoint; must be connected before the worker starts.
install_worker_metrics(app)
app.autodiscover_tasks()


class DeclareTopology(bootsteps.StartStopStep):
    """Runs after the worker's broker connection is up, and again after each reconnect."""

    requires = {"celery.worker.consumer.connection:Connection"}

    def start(self, c) -> None:
        from messaging.topology import declare_topology

        declare_topology(c.connection)


app.steps["consumer"].add(DeclareTopology)
