"""ASGI entry point: HTTP through Django, WebSockets through Channels (daphne serves both)."""

import gc
import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the apps loaded)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat import routing as chat_routing  # noqa: E402
from chatproject.origins import SiteOriginValidator  # noqa: E402
from infrastructure.database_threads import BoundedHttpThreads  # noqa: E402
from monitoring import routing as monitoring_routing  # noqa: E402

application = ProtocolTypeRouter(
    {
        # A fixed set of threads for requests, so connections are bounded (database_threads).
        "http": BoundedHttpThreads(
            django_asgi_app, size=settings.WEB_HTTP_THREADS, idle_seconds=settings.DB_CONN_IDLE_SECONDS
        ),
        # Cookie auth makes cross-site socket hijacking possible; refusing foreign Origins
        # (scheme, host and port: chatproject/origins.py) is what CSRF protection is for forms.
        "websocket": SiteOriginValidator(
            AuthMiddlewareStack(
                URLRouter([*chat_routing.websocket_urlpatterns, *monitoring_routing.websocket_urlpatterns])
            )
        ),
    }
)

# The web process allocates a few objects per delivered frame, thousands per second; with the
# default thresholds the collector keeps re-scanning the loaded app and every socket's state, and
# its pauses become the latency tail.
# Freeze what start-up loaded (never garbage) and collect the young generation less often.
gc.freeze()
gc.set_threshold(50_000, 20, 20)
