"""The first thing each process's entry point does: load the settings, or exit with their one sentence.

Used by manage.py, the web process (chatproject/serve.py) and the Celery app (chatproject/celery.py).
"""

from __future__ import annotations

import sys

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def settings_load_or_exit() -> None:
    """Load chatproject/settings.py; on ImproperlyConfigured print its message alone and exit with 1.

    Each error settings.py raises is one sentence saying what to set; its traceback (some fifty lines
    through Django's, daphne's or Celery's start-up) would only bury that sentence at the bottom.
    """
    try:
        settings.INSTALLED_APPS  # noqa: B018 (the first attribute read imports the settings module)
    except ImproperlyConfigured as error:
        sys.exit(str(error))
