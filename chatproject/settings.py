"""Django settings. This module is the only place that reads the environment."""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from chatproject.broker import ANALYTICS_QUEUE, WORK_QUEUES, notifications_queue

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=False)
# An insecure fallback keeps `make run` a one-command start; production must set SECRET_KEY.
SECRET_KEY = env.str("SECRET_KEY", default="dev-insecure-change-me-" + "x" * 40)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    # Before django.contrib.admin: its admin/base_site.html adds the staff alert banner.
    "chatproject.monitoring",
    "django_prometheus",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
    "analytics",
    "chatproject.deadletters",
]

MIDDLEWARE = [
    # First and last: request counts and latencies by view and status for /metrics.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from the web process itself, so `make run` needs no separate web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
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
                "chatproject.monitoring.context_processors.staff_alerts",
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
# number of threads per process (chatproject/database_threads.py, docs/architecture.md).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
# No `SELECT 1` before each use of a pooled connection: on the socket's write path it was a
# round trip per message and doubled p99 under load (docs/performance.md). The cost: after a
# PostgreSQL restart, each pooled connection fails once (a socket answers `unavailable`, the
# page retries; a page view may answer 500 once), and Django then replaces it.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DB_CONN_HEALTH_CHECKS", default=False)
# A web process's thread closes its connection after this many seconds without work
# (chatproject/database_threads.py), so an idle web process holds no connections.
DB_CONN_IDLE_SECONDS = env.float("DB_CONN_IDLE_SECONDS", default=30.0)
if DB_CONN_IDLE_SECONDS <= 0:
    raise ImproperlyConfigured("DB_CONN_IDLE_SECONDS must be above 0")
# Threads that run HTTP requests in a web process (chatproject/database_threads.py): at most this
# many requests run Django's synchronous code at once, each thread holding at most one PostgreSQL
# connection; a request waits for a free thread. A web process's connections are at most this
# plus the socket write threads plus one (docs/architecture.md).
WEB_HTTP_THREADS = env.int("WEB_HTTP_THREADS", default=8)
if WEB_HTTP_THREADS < 1:
    raise ImproperlyConfigured("WEB_HTTP_THREADS must be at least 1")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://localhost:6379/0")
# Every Redis key and channel-layer name starts with this, so that several installations (or a
# test run beside `make run`) can share one Redis without reading each other's frames or buckets.
REDIS_KEY_PREFIX = env.str("REDIS_KEY_PREFIX", default="chat")
CHANNEL_LAYERS = {
    "default": {
        # Redis pub/sub: a group_send is one PUBLISH, and each web process receives it once per
        # room and fans it out to its own sockets. The list-based core layer pays one Redis round
        # trip per socket per message behind a single receive lock per process; at 10 rooms x
        # 10 clients x 2 msg/s it delivered 64% with p50 8 s (docs/performance.md). Delivery stays
        # at-most-once (nothing is delivered to a process that is not subscribed at that moment),
        # so clients still repair gaps through `seq`.
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{REDIS_KEY_PREFIX}:asgi"},
    },
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="amqp://guest:guest@localhost:5672//")
# Celery (chatproject/celery.py); queues and routes come from chatproject/broker.py.
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
# On a lost connection unacked (acks_late) messages are redelivered anyway; stop running copies.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Stock Celery acks (drops) a message it cannot decode; ours rejects it, so it is dead-lettered.
CELERY_WORKER_CONSUMER = "chatproject.worker_consumer:DeadLetteringConsumer"
# One module owns the topology; Celery declares and consumes exactly those queues.
# The notifications priority queue: classic, since priorities need classic queues before RabbitMQ
# 4.0 (chatproject/broker.py `notifications_queue` says what changes with "quorum").
NOTIFICATIONS_QUEUE_TYPE = env.str("NOTIFICATIONS_QUEUE_TYPE", default="classic")
CELERY_TASK_QUEUES = (*WORK_QUEUES, notifications_queue(queue_type=NOTIFICATIONS_QUEUE_TYPE))
CELERY_TASK_ROUTES = {
    "analytics.*": {"queue": ANALYTICS_QUEUE.name},
    "chat.deliver_mention_notifications": {"queue": "notifications"},
    "monitoring.*": {"queue": "monitoring"},
}
# A mention notification not delivered within this many seconds is no longer useful: RabbitMQ
# dead-letters it (reason "expired") instead of delivering it late.
NOTIFICATION_TTL_SECONDS = env.int("NOTIFICATION_TTL_SECONDS", default=600)
# Presence (chat/presence.py): each open socket refreshes its entry every HEARTBEAT seconds; an
# entry older than TTL (a crashed web process) no longer counts as online.
PRESENCE_HEARTBEAT_SECONDS = env.float("PRESENCE_HEARTBEAT_SECONDS", default=30.0)
PRESENCE_TTL_SECONDS = env.float("PRESENCE_TTL_SECONDS", default=75.0)
# The relay (chat/relay.py): events per published task message, the fallback poll when no
# NOTIFY arrives, and how long sent outbox rows are kept for inspection before pruning.
OUTBOX_BATCH_SIZE = env.int("OUTBOX_BATCH_SIZE", default=200)
OUTBOX_POLL_SECONDS = env.float("OUTBOX_POLL_SECONDS", default=5.0)
OUTBOX_RETENTION_DAYS = env.int("OUTBOX_RETENTION_DAYS", default=7)
# AMQP heartbeat interval of the relay's broker connection (whole seconds; 0 disables). A broker
# gone without FIN or RST (a network partition) is noticed after two silent intervals, also while
# idle, instead of at the next publish's 10 s confirm timeout; RabbitMQ's default of 60 s would
# leave a dead connection unnoticed for two minutes.
RELAY_HEARTBEAT_SECONDS = env.int("RELAY_HEARTBEAT_SECONDS", default=10)
# Analytics (analytics/tasks.py): a database outage is retried with exponential backoff and
# jitter, from BASE up to MAX_DELAY seconds, RETRY_MAX times (about 5 minutes in all), before
# the batch is dead-lettered for a person to replay.
ANALYTICS_RETRY_MAX = env.int("ANALYTICS_RETRY_MAX", default=12)
ANALYTICS_RETRY_BASE_DELAY = env.float("ANALYTICS_RETRY_BASE_DELAY", default=1.0)
ANALYTICS_RETRY_MAX_DELAY = env.float("ANALYTICS_RETRY_MAX_DELAY", default=60.0)
# The ledger (analytics.ProcessedEvent) keeps each counted event's id this many days after it was
# counted, then an hourly Celery beat task prunes it. A pruned id can no longer stop a duplicate,
# so the worker refuses (dead-letters, uncounted) any event created longer ago than this, less an
# hour (analytics.services.ledger_horizon): counting stays at most once whatever the value, and
# raising it never brings back events whose rows a shorter one pruned (analytics.LedgerPrune). The
# value is how old an event may be and still be counted: redeliveries of unacked messages come
# within minutes, retries end within ~5 minutes, a relay republishes on restart; only a long
# outage or a dead letter replayed late comes after that, and 30 days is far longer than a dead
# letter stays unresolved without raising a CRITICAL alert (DLQ_CRITICAL_AGE_SECONDS, a day).
ANALYTICS_LEDGER_RETENTION_DAYS = env.int("ANALYTICS_LEDGER_RETENTION_DAYS", default=30)
if ANALYTICS_LEDGER_RETENTION_DAYS < 1:
    # Less than the horizon's hour of margin would refuse every event, fresh ones included.
    raise ImproperlyConfigured("ANALYTICS_LEDGER_RETENTION_DAYS must be at least 1")
# Fault injection for tests/analytics only (0 in production): the worker pauses this long
# "in_transaction" (counts written, not committed) or "after_commit" (committed, not acked),
# so a test can SIGKILL it at that exact point.
ANALYTICS_FAULT_PAUSE_SECONDS = env.float("ANALYTICS_FAULT_PAUSE_SECONDS", default=0.0)
ANALYTICS_FAULT_PAUSE_AT = env.str("ANALYTICS_FAULT_PAUSE_AT", default="in_transaction")
# Dead letters (chatproject/deadletters): deliveries the archiver holds unacked at once (a crash
# redelivers at most these, each archived once); how long failure details no dead letter claimed
# are kept; the RabbitMQ management API for queue rates (empty: passive declares only); and a
# test-only pause between commit and ack so tests/deadletters can SIGKILL the archiver there.
DLQ_ARCHIVER_PREFETCH = env.int("DLQ_ARCHIVER_PREFETCH", default=50)
DLQ_TASK_FAILURE_RETENTION_DAYS = env.int("DLQ_TASK_FAILURE_RETENTION_DAYS", default=7)
# Resolved (replayed or discarded) dead letters are deleted, with their audit rows, this many days
# after their last replay or discard; `new` ones never are. Safe: a person has decided on each,
# and a month keeps it, its error and who acted on it through any post-mortem or monthly review.
# Deleting one loses only the option to replay it again, which a person already used (replayed)
# or declined (discarded).
DLQ_RESOLVED_RETENTION_DAYS = env.int("DLQ_RESOLVED_RETENTION_DAYS", default=30)
RABBITMQ_MANAGEMENT_URL = env.str("RABBITMQ_MANAGEMENT_URL", default="http://localhost:15672")
DLQ_ARCHIVER_FAULT_PAUSE_SECONDS = env.float("DLQ_ARCHIVER_FAULT_PAUSE_SECONDS", default=0.0)
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
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Finders in use too, so static files work without collectstatic during development.
WHITENOISE_USE_FINDERS = True

EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")

# Chat limits (docs/protocol.md).
CHAT_MAX_MESSAGE_CHARS = env.int("CHAT_MAX_MESSAGE_CHARS", default=4000)
CHAT_MAX_FRAME_BYTES = env.int("CHAT_MAX_FRAME_BYTES", default=64 * 1024)
CHAT_RATE_PER_SECOND = env.float("CHAT_RATE_PER_SECOND", default=5.0)
CHAT_RATE_BURST = env.int("CHAT_RATE_BURST", default=20)
# How many missed messages a reconnecting socket gets replayed before it is told to resync.
CHAT_REPLAY_LIMIT = env.int("CHAT_REPLAY_LIMIT", default=500)
CHAT_HISTORY_PAGE = 50

# Monitoring (chatproject/monitoring, docs/monitoring.md). Metrics ports of the processes that
# serve no HTTP: Celery workers (`--metrics-port` overrides per worker; 0 disables) and the relay.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=9808)
RELAY_METRICS_PORT = env.int("RELAY_METRICS_PORT", default=9809)
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
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
