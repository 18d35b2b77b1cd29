"""Settings of processes under fault-injection tests: production's plus FAULT_POINTS.

Children get DJANGO_SETTINGS_MODULE=tests.faults.settings and FAULT_POINTS="name=crash,name=seconds"
(infrastructure/faults.py); manage.py and chatproject/celery.py only setdefault the module.
"""

import os

from chatproject.settings import *  # noqa: F403

FAULT_POINTS: dict[str, str] = dict(
    point.strip().split("=", 1) for point in os.environ.get("FAULT_POINTS", "").split(",") if point.strip()
)
