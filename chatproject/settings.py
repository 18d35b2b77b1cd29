"""Django settings. This module is the only place that reads the environment."""

import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from messaging.events import task_routes
from messaging.topology import notifications_queues, work_queues

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A checkout's own .env (git- and docker-ignored; `make run` writes a SECRET_KEY there once) fills in
# what the real environment leaves unset; the environment always wins.
environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)
# No built-in fallback: a key everyone can read in the source would let anyone forge sessions.
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set: set it in the environment (or in .env) to a long random value, e.g. "
        "the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(50))'`."
    )
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# The port this process listens on, given by the Procfile's runner (honcho numbers each process
# type's from `--port` on: the load balancer `lb` has the public one, the web processes the ones
# after PORT + 100; docs/scaling.md "Web tier").
PORT = env.int("PORT", default=8000)
# The site's scheme and port as browsers see them (behind a TLS proxy: https and 443), and the origins
# whose pages may open sockets (chatproject/origins.py compares scheme, host and port): by default
# each ALLOWED_HOSTS host at that scheme and port, plus CSRF_TRUSTED_ORIGINS. SITE_PORT defaults to
# PORT, right for a process that browsers reach directly; web processes behind the load balancer get
# the balancer's port from `make run` and docker-compose.yml.
SITE_SCHEME = env.str("SITE_SCHEME", default="http")
SITE_PORT = env.int("SITE_PORT", default=PORT)
_SITE_PORT_SUFFIX = "" if (SITE_SCHEME, SITE_PORT) in (("http", 80), ("https", 443)) else f":{SITE_PORT}"
CHAT_ALLOWED_ORIGINS = env.list(
    "CHAT_ALLOWED_ORIGINS",
    default=[f"{SITE_SCHEME}://{host}{_SITE_PORT_SUFFIX}" for host in ALLOWED_HOSTS] + CSRF_TRUSTED_ORIGINS,
)
# The site's address as people reach it, for links in mails (a mention email's room link): by
# default the first ALLOWED_HOSTS host (a wildcard one: localhost) at SITE_SCHEME and SITE_PORT.
_site_host = ALLOWED_HOSTS[0].lstrip(".") if ALLOWED_HOSTS and ALLOWED_HOSTS[0] != "*" else "localhost"
SITE_URL = env.str("SITE_URL", default=f"{SITE_SCHEME}://{_site_host}{_SITE_PORT_SUFFIX}").rstrip("/")

INSTALLED_APPS = [
    "daphne",
    # Before django.contrib.admin: its admin/base_site.html adds the staff alert banner.
    "monitoring",
    "django_prometheus",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # Failed-login records and lockouts (chat/accounts.py); its admin lists them for staff to lift.
    "axes",
    "channels",
    "messaging",
    "chat",
    "analytics",
    "deadletters",
    "bench",
]

MIDDLEWARE = [
    # First and last: request counts and latencies by view and status for /metrics.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from the web process itself, so `make run` needs no separate web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # The Content-Security-Policy header (CONTENT_SECURITY_POLICY below) on every response.
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Innermost: turns a locked-out login into the lockout page (429) before Prometheus counts it.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "monitoring.context_processors.staff_alerts",
            ],
        },
    },
]

# Also how `manage.py soak` tells which running processes use the default database.
DEFAULT_DATABASE_URL = "postgres://postgres@localhost:5432/chat"
DATABASES = {
    "default": env.db("DATABASE_URL", default=DEFAULT_DATABASE_URL),
}
# Persistent connections: each thread reuses its own instead of opening a PostgreSQL connection
# per message or request, and replaces it after this many seconds. Only safe with a bounded
# number of threads per process (infrastructure/database_threads.py, docs/architecture.md).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
# No `SELECT 1` before each use of a pooled connection: on the socket's write path it would be
# a round trip per message, inside the latency every sender waits for. The cost: after a
# PostgreSQL restart, each pooled connection fails once (a socket answers `unavailable`, the
# page retries; a page view may answer 500 once), and Django then replaces it.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DB_CONN_HEALTH_CHECKS", default=False)
# A web process's thread closes its connection after this many seconds without work
# (infrastructure/database_threads.py), so an idle web process holds no connections.
DB_CONN_IDLE_SECONDS = env.float("DB_CONN_IDLE_SECONDS", default=30.0)
if DB_CONN_IDLE_SECONDS <= 0:
    raise ImproperlyConfigured("DB_CONN_IDLE_SECONDS must be above 0")
# Threads that run HTTP requests in a web process (infrastructure/database_threads.py): at most this
# many requests run Django's synchronous code at once, each thread holding at most one PostgreSQL
# connection; a request waits for a free thread. A web process's connections are at most this
# plus the socket write threads plus one (docs/architecture.md).
WEB_HTTP_THREADS = env.int("WEB_HTTP_THREADS", default=8)
if WEB_HTTP_THREADS < 1:
    raise ImproperlyConfigured("WEB_HTTP_THREADS must be at least 1")

# The web tier (docs/scaling.md "Web tier"): WEB_CONCURRENCY web processes behind HAProxy, the
# Procfile's `lb` (chatproject/loadbalancer.py), which listens on HOST:PORT.
HOST = env.str("HOST", default="127.0.0.1")
# One web process per core by default: a process runs on one event loop, so on one core.
WEB_CONCURRENCY = env.int("WEB_CONCURRENCY", default=len(os.sched_getaffinity(0)))
if WEB_CONCURRENCY < 1:
    raise ImproperlyConfigured("WEB_CONCURRENCY must be at least 1")
# Where the load balancer finds the web processes, `host:port` each. By default WEB_CONCURRENCY
# ports on loopback from PORT + 100: where honcho puts the Procfile's `web` processes (`make run`).
WEB_SERVERS = env.list("WEB_SERVERS", default=[f"127.0.0.1:{PORT + 100 + i}" for i in range(WEB_CONCURRENCY)])
# Or `name:port`, a DNS name whose addresses are the web processes (docker-compose's replicas of
# `web`): the load balancer asks /etc/resolv.conf's resolvers for up to WEB_CONCURRENCY of them,
# again while it runs, so replicas may come and go; WEB_SERVERS is then unused.
WEB_SERVERS_DNS = env.str("WEB_SERVERS_DNS", default="")
# On SIGTERM a web process first fails its health check for this long, still serving
# (chatproject/serve.py): the load balancer, which takes a server out after two failed checks
# (ops/haproxy/haproxy.cfg.template, at most about 1.5 s), then sends it nothing new when it stops
# listening.
WEB_DRAIN_SECONDS = env.float("WEB_DRAIN_SECONDS", default=2.0)
# Then it closes its sockets (1012) and gives their consumers and any request in progress this long
# to finish before it exits.
WEB_SHUTDOWN_SECONDS = env.float("WEB_SHUTDOWN_SECONDS", default=10.0)
# Where the load balancer writes the HAProxy config it generates and HAProxy's admin socket
# (`show stat`: each web process's state and connections), one directory per public port.
LOADBALANCER_RUN_DIR = Path(
    env.str("LOADBALANCER_RUN_DIR", default=str(Path(tempfile.gettempdir()) / f"chat-lb-{PORT}"))
)


def _command_application_name(argv: list[str]) -> str:
    """chat-<manage.py subcommand>, else chat-<program> (chat-celery, chat-serve, chat-pytest)."""
    program = Path(argv[0]).stem if argv and argv[0] else "python"
    if program == "manage" and len(argv) > 1:
        return f"chat-{argv[1]}"
    return f"chat-{program}"


# Each process names its PostgreSQL sessions (pg_stat_activity.application_name), so an operator
# sees whose connections are whose; the Procfile names each process (docs/architecture.md).
_database_options = DATABASES["default"].setdefault("OPTIONS", {})
_database_options["application_name"] = env.str(
    "DB_APPLICATION_NAME",
    default=_database_options.get("application_name") or _command_application_name(sys.argv),
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://localhost:6379/0")
# Every Redis key and channel-layer name starts with this, so that several installations (or a
# test run beside `make run`) can share one Redis without reading each other's frames or buckets.
REDIS_KEY_PREFIX = env.str("REDIS_KEY_PREFIX", default="chat")
CHANNEL_LAYERS = {
    "default": {
        # Redis pub/sub: a group_send is one PUBLISH, and each web process receives it once per
        # room and fans it out to its own sockets. The list-based core layer pays one Redis round
        # trip per socket per message behind a single receive lock per process, which cannot
        # keep up with a busy room. Delivery stays
        # at-most-once (nothing is delivered to a process that is not subscribed at that moment),
        # so clients still repair gaps through `seq`.
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_KEY_PREFIX}:asgi"},
    },
}

# One node, or a cluster's nodes as kombu's failover URL (`amqp://a//;amqp://b//;amqp://c//`): every
# broker client (the relay, the archiver, replay, setup_broker, queues, /healthz, and Celery's
# workers) uses the first node that answers and moves to the next when it is lost (docs/scaling.md).
# List every node of the cluster: /healthz counts a majority of them as "working".
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="amqp://guest:guest@localhost:5672//")
# Celery (chatproject/celery.py); queues and routes come from messaging/topology.py.
# JSON only: a message is data other processes (the relay, the DLQ archiver) build and read; no pickle.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
# Nobody waits on task results; storing them would only add a result queue per task.
CELERY_TASK_IGNORE_RESULT = True
# Ack after the task's effects are committed, so a killed worker's message is redelivered.
CELERY_TASK_ACKS_LATE = True
# A worker process killed mid-task (SIGKILL, OOM) leaves its message to be redelivered, not acked.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A task that fails for good is rejected without requeue, so RabbitMQ dead-letters it.
CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT = False
# One unacked message per process: ordered consumption, and a crash redelivers at most one.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Publisher confirms: apply_async returns only once RabbitMQ has taken the message.
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
# A worker started before RabbitMQ waits for it instead of exiting.
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# On quorum queues (BROKER_QUEUE_TYPE=quorum) the worker sets its prefetch per consumer: RabbitMQ
# refuses a global QoS on them. Celery's default, spelled out because the prefetch of 1 above
# depends on it.
CELERY_WORKER_DETECT_QUORUM_QUEUES = True
# On a lost connection unacked (acks_late) messages are redelivered anyway; stop running copies.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Stock Celery acks (drops) a message it cannot decode; ours rejects it, so it is dead-lettered.
CELERY_WORKER_CONSUMER = "messaging.worker_intake:DeadLetteringIntake"
# One module owns the topology; Celery declares and consumes exactly those queues.
# Every queue (analytics, monitoring, notifications, VIP notifications, dead letters): classic on
# one node (a quorum queue there replicates to nobody and only costs throughput); quorum on a
# cluster, so losing a node loses no event, notification or dead letter (docs/scaling.md).
BROKER_QUEUE_TYPE = env.str("BROKER_QUEUE_TYPE", default="classic")
CELERY_TASK_QUEUES = (
    *work_queues(queue_type=BROKER_QUEUE_TYPE),
    *notifications_queues(queue_type=BROKER_QUEUE_TYPE),
)
# Each event's task to its event's queue, each beat task to its worker's (messaging/events.py).
CELERY_TASK_ROUTES = task_routes()
# The RabbitMQ node `rabbitmqctl -n` names when the benchmarks and the test suite create their
# scratch vhosts on CELERY_BROKER_URL's broker: on a cluster, any of its nodes (vhosts are
# cluster-wide; e.g. chat1@localhost for ops/rabbitmq-cluster); empty for rabbitmqctl's default,
# the node installed on this machine.
RABBITMQCTL_NODE = env.str("RABBITMQCTL_NODE", default="")
# A mention notification not delivered within this many seconds is no longer useful: RabbitMQ
# dead-letters it (reason "expired") instead of delivering it late.
NOTIFICATION_TTL_SECONDS = env.int("NOTIFICATION_TTL_SECONDS", default=600)
# A notification pushed to open sockets counts as delivered only once a page acknowledges it; a
# push no page acknowledged within ACK seconds (its web process died, the tab was closing) is
# emailed instead, by a beat task that looks for such pushes every ACK_SWEEP seconds.
NOTIFICATION_ACK_SECONDS = env.float("NOTIFICATION_ACK_SECONDS", default=30.0)
NOTIFICATION_ACK_SWEEP_SECONDS = env.float("NOTIFICATION_ACK_SWEEP_SECONDS", default=5.0)
# Presence (chat/presence.py): each open socket refreshes its entry every HEARTBEAT seconds; an
# entry older than TTL (a crashed web process) no longer counts as online.
PRESENCE_HEARTBEAT_SECONDS = env.float("PRESENCE_HEARTBEAT_SECONDS", default=30.0)
PRESENCE_TTL_SECONDS = env.float("PRESENCE_TTL_SECONDS", default=75.0)
# The relay (messaging/relay.py): events per published task message, the fallback poll when no
# NOTIFY arrives, and how long sent outbox rows are kept for inspection before pruning.
OUTBOX_BATCH_SIZE = env.int("OUTBOX_BATCH_SIZE", default=200)
OUTBOX_POLL_SECONDS = env.float("OUTBOX_POLL_SECONDS", default=5.0)
OUTBOX_RETENTION_DAYS = env.int("OUTBOX_RETENTION_DAYS", default=7)
# AMQP heartbeat interval of the relay's broker connection (whole seconds; 0 disables). A broker
# gone without FIN or RST (a network partition) is noticed after two silent intervals, also while
# idle, instead of at the next publish's 10 s confirm timeout; RabbitMQ's default of 60 s would
# leave a dead connection unnoticed for two minutes.
RELAY_HEARTBEAT_SECONDS = env.int("RELAY_HEARTBEAT_SECONDS", default=10)
# Analytics (analytics/tasks.py): a database outage is retried RETRY_MAX times (at most about 7
# minutes in all, half that on average) with Celery's exponential backoff and full jitter
# (messaging/retrying.py), the ceiling doubling from BASE up to MAX_DELAY, before the batch is
# dead-lettered for a person to replay.
# Whole seconds: Celery's backoff takes no fractions, and a BASE of 0 would turn it off.
ANALYTICS_RETRY_MAX = env.int("ANALYTICS_RETRY_MAX", default=12)
ANALYTICS_RETRY_BASE_DELAY = env.int("ANALYTICS_RETRY_BASE_DELAY", default=1)
ANALYTICS_RETRY_MAX_DELAY = env.int("ANALYTICS_RETRY_MAX_DELAY", default=60)
if ANALYTICS_RETRY_BASE_DELAY < 1 or ANALYTICS_RETRY_MAX_DELAY < 0:
    raise ImproperlyConfigured(
        "ANALYTICS_RETRY_BASE_DELAY must be at least 1 and ANALYTICS_RETRY_MAX_DELAY at least 0 "
        "(whole seconds)"
    )
# The ledger (analytics.ProcessedEvent) keeps each counted event's id this many days after it was
# counted, then an hourly Celery beat task prunes it. A pruned id can no longer stop a duplicate,
# so the worker refuses (dead-letters, uncounted) any event created longer ago than this, less an
# hour (analytics.services.ledger_horizon): counting stays at most once whatever the value, and
# raising it never brings back events whose rows a shorter one pruned (analytics.LedgerPrune). The
# value is how old an event may be and still be counted: redeliveries of unacked messages come
# within minutes, retries end within ~7 minutes, a relay republishes on restart; only a long
# outage or a dead letter replayed late comes after that, and 30 days is far longer than a dead
# letter stays unresolved without raising a CRITICAL alert (DLQ_CRITICAL_AGE_SECONDS, a day).
ANALYTICS_LEDGER_RETENTION_DAYS = env.int("ANALYTICS_LEDGER_RETENTION_DAYS", default=30)
if ANALYTICS_LEDGER_RETENTION_DAYS < 1:
    # Less than the horizon's hour of margin would refuse every event, fresh ones included.
    raise ImproperlyConfigured("ANALYTICS_LEDGER_RETENTION_DAYS must be at least 1")
# Dead letters (deadletters): deliveries the archiver holds unacked at once (a crash
# redelivers at most these, each archived once); how long failure details no dead letter claimed
# are kept; and the RabbitMQ management API for queue rates (empty: passive declares only).
DLQ_ARCHIVER_PREFETCH = env.int("DLQ_ARCHIVER_PREFETCH", default=50)
DLQ_TASK_FAILURE_RETENTION_DAYS = env.int("DLQ_TASK_FAILURE_RETENTION_DAYS", default=7)
# Resolved (replayed or discarded) dead letters are deleted, with their audit rows, this many days
# after their last replay or discard; `new` ones never are. Safe: a person has decided on each,
# and a month keeps it, its error and who acted on it through any post-mortem or monthly review.
# Deleting one loses only the option to replay it again, which a person already used (replayed)
# or declined (discarded).
DLQ_RESOLVED_RETENTION_DAYS = env.int("DLQ_RESOLVED_RETENTION_DAYS", default=30)
# The management API gives the broker status page and `manage.py queues` unacked counts, rates and
# where each queue lives. Each node of a cluster serves its own, so on a cluster it may list one
# per node, `;`-separated like CELERY_BROKER_URL and in the same order (node i's vhost and, unless
# its URL has its own, credentials come from CELERY_BROKER_URL's node i): the first that answers is
# used, and each node's name is shown beside it. A single URL serves every node.
RABBITMQ_MANAGEMENT_URL = env.str("RABBITMQ_MANAGEMENT_URL", default="http://localhost:15672")
_MANAGEMENT_URLS = [url for url in RABBITMQ_MANAGEMENT_URL.split(";") if url.strip()]
_BROKER_NODES = [url for url in CELERY_BROKER_URL.split(";") if url.strip()]
if len(_MANAGEMENT_URLS) > 1 and len(_MANAGEMENT_URLS) != len(_BROKER_NODES):
    raise ImproperlyConfigured(
        f"RABBITMQ_MANAGEMENT_URL lists {len(_MANAGEMENT_URLS)} URLs and CELERY_BROKER_URL "
        f"{len(_BROKER_NODES)} nodes: list one management URL per broker node, in the same order, or just one"
    )
# A dead letter the database refuses even in minimal form (in practice it refuses every row: a missing
# migration, a read-only database) is held unacked this long, then handed back to RabbitMQ to be
# tried again: once per interval, not a hot loop, and never dropped. Keep it under RabbitMQ's
# consumer_timeout (30 min by default), which would close the channel instead.
DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS = env.float("DLQ_ARCHIVER_UNSTORABLE_RETRY_SECONDS", default=600.0)
# AMQP heartbeat interval of the archiver's broker connection (whole seconds; 0 disables), for the
# reason RELAY_HEARTBEAT_SECONDS gives: a broker gone without FIN or RST is noticed after two silent
# intervals, also while idle, and the connection replaced, instead of the archiver waiting on it.
DLQ_ARCHIVER_HEARTBEAT_SECONDS = env.int("DLQ_ARCHIVER_HEARTBEAT_SECONDS", default=10)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Axes first: it refuses a locked-out username or address before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Login throttling (chat/accounts.py): a username locks after this many failed logins from any
# addresses, an address after this many for any usernames (higher: an office shares one); both
# count failures within LOGIN_LOCKOUT_MINUTES of each other and stay locked that long after.
LOGIN_FAILURES_PER_USERNAME = env.int("LOGIN_FAILURES_PER_USERNAME", default=5)
LOGIN_FAILURES_PER_ADDRESS = env.int("LOGIN_FAILURES_PER_ADDRESS", default=20)
LOGIN_LOCKOUT_MINUTES = env.float("LOGIN_LOCKOUT_MINUTES", default=15.0)
if min(LOGIN_FAILURES_PER_USERNAME, LOGIN_FAILURES_PER_ADDRESS) < 1 or LOGIN_LOCKOUT_MINUTES <= 0:
    raise ImproperlyConfigured(
        "LOGIN_FAILURES_PER_USERNAME and LOGIN_FAILURES_PER_ADDRESS must be at least 1, "
        "and LOGIN_LOCKOUT_MINUTES above 0"
    )
# Accounts created per client address per hour (all at once, then back evenly over the hour); 0: no limit.
SIGNUPS_PER_ADDRESS_PER_HOUR = env.int("SIGNUPS_PER_ADDRESS_PER_HOUR", default=10)
# Behind reverse proxies: the header they set with the client's address (e.g. X-Forwarded-For or
# X-Real-IP) and how many proxies append to it (chat/client_address.py). Empty: the direct
# peer's address, and every forwarding header is ignored (a client could write any of them).
TRUSTED_PROXY_CLIENT_IP_HEADER = env.str("TRUSTED_PROXY_CLIENT_IP_HEADER", default="")
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=1)
if TRUSTED_PROXY_COUNT < 1:
    raise ImproperlyConfigured("TRUSTED_PROXY_COUNT must be at least 1 (proxies in front of the web process)")
AXES_HANDLER = "chat.accounts.LoginLockoutHandler"
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_FAILURE_LIMIT = LOGIN_FAILURES_PER_USERNAME
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_LOCKOUT_MINUTES)
# Attempts while locked are refused without being counted, so the lock ends when the page says.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_CLIENT_IP_CALLABLE = "chat.client_address.client_address"
AXES_LOCKOUT_CALLABLE = "chat.accounts.lockout_response"
# No row per successful login: nothing would ever prune them, and the table would grow with every
# login. Failed attempts are kept only while they count (axes deletes them after the cool-off).
AXES_DISABLE_ACCESS_LOG = True
# Masked in axes' log lines and its stored form data (it always masks the password).
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "csrfmiddlewaretoken"]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# HTTPS (docs/deployment.md): all off by default, so `make run` works over plain http://127.0.0.1;
# docs/deployment.md gives the production values, with which `manage.py check --deploy` is clean.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Health checks and Prometheus reach the process itself over plain HTTP, not through the proxy.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# "HEADER,value" as the TLS-terminating proxy sets it, e.g. "HTTP_X_FORWARDED_PROTO,https". Only
# behind a proxy that always sets (or strips) that header: otherwise a client could claim HTTPS.
_proxy_ssl_header = env.str("SECURE_PROXY_SSL_HEADER", default="")
if _proxy_ssl_header:
    _header, _, _value = (part.strip() for part in _proxy_ssl_header.partition(","))
    if not _header.startswith("HTTP_") or not _value:
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must be 'HTTP_<HEADER>,<value>', e.g. "
            f"'HTTP_X_FORWARDED_PROTO,https', not {_proxy_ssl_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_header, _value)

# Content-Security-Policy (docs/deployment.md): scripts, styles and everything else from this
# origin only, so no inline script, event handler or style attribute runs, injected or not. Page
# data travels in json_script blocks, which are not executed. connect-src 'self' also covers the
# page's own ws:/wss: origin (CSP Level 3, checked in Chromium by tests/e2e/test_content_security_policy.py).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        # data: for the empty favicon of every page (`<link rel="icon" href="data:,">`).
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where collectstatic puts the files the web process serves (`make run` and the Docker build run it;
# the tests collect into a directory of their own).
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Content-hashed names, so WhiteNoise lets browsers cache them for a year (a changed file gets a
    # new name), plus compressed copies it serves to clients that accept them. With DEBUG off, pages
    # need collectstatic's manifest; with DEBUG on, plain names come from the apps' folders.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Outgoing mail (password resets, mention emails, alerts) in django-environ's EMAIL_URL format
# (smtp+tls://user:password@host:587, dummymail://, ...). The console backend writes every mail,
# reset links included, to the process's log, so it is the default only with DEBUG; without DEBUG
# the default is Django's own, SMTP on localhost:25: a mail is sent or fails visibly (the reset
# page answers an error, the notifier retries and then dead-letters), never dropped silently.
_email_url = env.str("EMAIL_URL", default="") or ("consolemail://" if DEBUG else "smtp://localhost:25")
_email_scheme = _email_url.partition(":")[0]
if _email_scheme not in environ.Env.EMAIL_SCHEMES:
    raise ImproperlyConfigured(
        f"EMAIL_URL must start with one of {', '.join(environ.Env.EMAIL_SCHEMES)}; got {_email_scheme!r}"
    )
_email = environ.Env.email_url_config(_email_url)
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
EMAIL_HOST = _email["EMAIL_HOST"] or "localhost"
EMAIL_PORT = _email["EMAIL_PORT"] or 25
EMAIL_HOST_USER = _email["EMAIL_HOST_USER"] or ""
EMAIL_HOST_PASSWORD = _email["EMAIL_HOST_PASSWORD"] or ""
EMAIL_USE_TLS = _email.get("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = _email.get("EMAIL_USE_SSL", False)
# filemail:////var/mail/chat (four slashes for an absolute directory): one file per mail.
EMAIL_FILE_PATH = _email["EMAIL_FILE_PATH"]
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="chat@localhost")

# Chat limits (docs/protocol.md).
CHAT_MAX_MESSAGE_CHARS = env.int("CHAT_MAX_MESSAGE_CHARS", default=4000)
CHAT_MAX_FRAME_BYTES = env.int("CHAT_MAX_FRAME_BYTES", default=64 * 1024)
CHAT_RATE_PER_SECOND = env.float("CHAT_RATE_PER_SECOND", default=5.0)
CHAT_RATE_BURST = env.int("CHAT_RATE_BURST", default=20)
# How many missed messages a reconnecting socket gets replayed before it is told to resync.
CHAT_REPLAY_LIMIT = env.int("CHAT_REPLAY_LIMIT", default=500)
# How often (give or take half) an open socket checks its session, user and room again: the
# safety net for revocations no signal reports (chat/access.py); the others close it at once.
CHAT_ACCESS_RECHECK_SECONDS = env.float("CHAT_ACCESS_RECHECK_SECONDS", default=60.0)
CHAT_HISTORY_PAGE = 50

# Monitoring (monitoring, docs/monitoring.md). Metrics ports of the processes that
# serve no HTTP: Celery workers (`--metrics-port` overrides per worker; 0 disables) and the relay.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=9808)
RELAY_METRICS_PORT = env.int("RELAY_METRICS_PORT", default=9809)
# The address those ports listen on. They have no authentication, so loopback by default; set the
# address of an interface only the monitoring network reaches (0.0.0.0 inside a container whose
# ports are not published, as in docker-compose.yml), never a public one.
METRICS_BIND_ADDRESS = env.str("METRICS_BIND_ADDRESS", default="127.0.0.1")
# Where a worker's pool processes write their metric files; empty: a fresh temp dir per worker.
WORKER_METRICS_DIR = env.str("WORKER_METRICS_DIR", default="")
# A scrape or a check waits at most this long for RabbitMQ or Redis, and /metrics probes
# RabbitMQ at most once per QUEUE_CACHE seconds per process.
METRICS_SOURCE_TIMEOUT_SECONDS = env.float("METRICS_SOURCE_TIMEOUT_SECONDS", default=1.0)
METRICS_QUEUE_CACHE_SECONDS = env.float("METRICS_QUEUE_CACHE_SECONDS", default=10.0)
# Who may read the web process's /metrics (the direct peer address): loopback and private nets,
# where Prometheus runs; behind a public reverse proxy, also block /metrics there.
METRICS_ALLOWED_NETWORKS = env.list(
    "METRICS_ALLOWED_NETWORKS",
    default=["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
)
# With a token set, /metrics answers only requests carrying `Authorization: Bearer <token>`, from any
# address, and the networks above no longer suffice (behind a reverse proxy every peer is loopback).
METRICS_BEARER_TOKEN = env.str("METRICS_BEARER_TOKEN", default="")
# The periodic alert check (Celery beat): every 30 s, so trouble is noticed within a minute.
ALERT_CHECK_SECONDS = env.float("ALERT_CHECK_SECONDS", default=30.0)
# Unresolved (status "new") dead letters: any one is worth a look (WARNING); a pile or one left
# for a day is CRITICAL. A count of 0 disables that threshold.
DLQ_WARNING_COUNT = env.int("DLQ_WARNING_COUNT", default=1)
DLQ_CRITICAL_COUNT = env.int("DLQ_CRITICAL_COUNT", default=50)
DLQ_WARNING_AGE_SECONDS = env.float("DLQ_WARNING_AGE_SECONDS", default=3600.0)
DLQ_CRITICAL_AGE_SECONDS = env.float("DLQ_CRITICAL_AGE_SECONDS", default=86400.0)
# A queue backlog of at least MIN messages that would take longer than DRAIN seconds at the net
# rate it fell over the last WINDOW seconds (or is not falling) raises a WARNING.
QUEUE_BACKLOG_MIN_MESSAGES = env.int("QUEUE_BACKLOG_MIN_MESSAGES", default=100)
QUEUE_DRAIN_WARNING_SECONDS = env.float("QUEUE_DRAIN_WARNING_SECONDS", default=600.0)
QUEUE_RATE_WINDOW_SECONDS = env.float("QUEUE_RATE_WINDOW_SECONDS", default=300.0)
# Slack-compatible incoming webhook for alerts (empty: none); mail goes to ADMINS ("a@x,b@y").
ALERT_WEBHOOK_URL = env.str("ALERT_WEBHOOK_URL", default="")
ADMINS = [(address, address) for address in env.list("ADMINS", default=[])]
SERVER_EMAIL = env.str("SERVER_EMAIL", default="chat-alerts@localhost")
EMAIL_SUBJECT_PREFIX = "[chat] "
# Beat's record of when each entry last ran: in the checkout (git-ignored), so two checkouts on one
# machine never share it; BEAT_SCHEDULE_FILENAME moves it (a read-only checkout, a test's directory).
CELERY_BEAT_SCHEDULE_FILENAME = env.str(
    "BEAT_SCHEDULE_FILENAME", default=str(BASE_DIR / ".celerybeat-schedule")
)
CELERY_BEAT_SCHEDULE = {
    "monitoring-check-alerts": {
        "task": "monitoring.check_alerts",
        "schedule": ALERT_CHECK_SECONDS,
        # A check older than its successor is useless: a stopped monitor worker does not
        # come back to a burst of stale checks (expired tasks are acked, not dead-lettered).
        "options": {"expires": ALERT_CHECK_SECONDS},
    },
    # Hourly, like the outbox and task-failure prunes: each run deletes about an hour's worth of
    # ledger rows, in chunks, on the analytics queue (the analytics worker owns its ledger).
    "analytics-prune-processed-events": {
        "task": "analytics.prune_processed_events",
        "schedule": 3600.0,
        # Same reasoning: after an analytics outage one prune catches up on everything.
        "options": {"expires": 3600.0},
    },
    # On the normal notifications queue, in turn with normal mentions (never on the VIP notifier,
    # whose capacity is the VIP mentions'); each run emails a bounded batch. A stopped notifier
    # does not come back to a pile of sweeps (expired ones are not run): one catches up on every
    # due push.
    "chat-send-notification-fallback-emails": {
        "task": "chat.send_notification_fallback_emails",
        "schedule": NOTIFICATION_ACK_SWEEP_SECONDS,
        "options": {"expires": NOTIFICATION_ACK_SWEEP_SECONDS},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {
        "refusal_without_traceback": {"()": "chatproject.log_filters.RefusalWithoutTraceback"},
        "load_balancer_check_while_shutting_down": {
            "()": "chatproject.log_filters.LoadBalancerCheckWhileShuttingDown"
        },
        # The fallback-email sweep runs every few seconds and nearly always finds nothing: its
        # receipt, beat's sending line and an idle sweep's result are dropped (chat/task_logging.py).
        "idle_fallback_sweep": {"()": "chat.task_logging.IdleFallbackSweepFilter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        # A 403 is a user lacking a permission, not a fault: one line, without Django's traceback.
        # A web process shutting down fails the load balancer's checks on purpose: no line at all.
        "django.request": {
            "filters": ["refusal_without_traceback", "load_balancer_check_while_shutting_down"]
        },
        # Axes announces itself at every start and each successful login at INFO: a line per
        # management command and per login that says nothing. Lockouts and failures stay (WARNING).
        "axes": {"level": "WARNING"},
        "celery.worker.strategy": {"filters": ["idle_fallback_sweep"]},
        "celery.app.trace": {"filters": ["idle_fallback_sweep"]},
        "celery.beat": {"filters": ["idle_fallback_sweep"]},
    },
}
