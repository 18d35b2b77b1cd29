# `make run` and `make test` do every set-up step on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# Web processes `make run` starts behind the load balancer: one per core unless set (in the
# environment or here, not in .env: honcho would hand .env's value to the load balancer only).
WEB_CONCURRENCY ?= $(shell nproc)
export WEB_CONCURRENCY
# pytest-xdist workers for `make test`: two take the serial 29.5 minutes to about 18 on two cores,
# where the run keeps the CPU 85-90% busy, so more workers would add contention, not speed.
TEST_WORKERS ?= 2

.PHONY: run test install lint format browser promtool docker-compose haproxy rabbitmq-management secret-key \
	rabbitmq-cluster rabbitmq-cluster-stop

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# Browser tests drive Debian's Chromium; Playwright's own browser download is not possible here.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "Chromium is missing: run 'sudo apt-get install -y chromium'" >&2; exit 1; fi; }

# tests/monitoring checks ops/prometheus/alerts.yml with promtool, from Debian's prometheus package.
promtool:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "promtool is missing: run 'sudo apt-get install -y prometheus'" >&2; exit 1; fi; }

# tests/ops checks docker-compose.yml and its cluster variant with `docker-compose config`, from Debian's
# docker-compose package (compose v1: its command is `docker-compose`, not the `docker compose` plugin).
docker-compose:
	@command -v docker-compose >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose; \
	  else echo "docker-compose is missing: run 'sudo apt-get install -y docker-compose'" >&2; exit 1; fi; }

# The load balancer in front of the web processes (the Procfile's `lb`) is Debian's HAProxy; Debian
# installs it in /usr/sbin, which is not on every user's PATH.
haproxy:
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy; \
	  else echo "HAProxy is missing: run 'sudo apt-get install -y haproxy'" >&2; exit 1; fi; }

# The management plugin serves the UI on :15672 and the queue rates `manage.py queues` and the
# dead-letter admin read (docs/dead-letters.md); RabbitMQ does not enable it by default. Without
# it the chat still works (queue depths come from passive declares), so this only warns.
rabbitmq-management:
	@command -v rabbitmq-plugins >/dev/null || { echo "Note: rabbitmq-plugins is not here; enable rabbitmq_management where RabbitMQ runs." >&2; exit 0; }; \
	rabbitmq-plugins -q is_enabled rabbitmq_management >/dev/null 2>&1 \
	  || rabbitmq-plugins -q enable rabbitmq_management >/dev/null \
	  || echo "Warning: cannot enable RabbitMQ's management plugin: run 'sudo rabbitmq-plugins enable rabbitmq_management'" >&2

# A three-node RabbitMQ cluster on loopback (AMQP 5680-5682, management 5690-5692), from the
# installed rabbitmq-server, as root (ops/rabbitmq-cluster/cluster.sh; docs/scaling.md).
# Point the chat at it as docs/scaling.md shows: every node in CELERY_BROKER_URL, BROKER_QUEUE_TYPE=quorum.
rabbitmq-cluster:
	ops/rabbitmq-cluster/cluster.sh start

rabbitmq-cluster-stop:
	ops/rabbitmq-cluster/cluster.sh stop

# settings.py refuses to start without SECRET_KEY. A checkout gets a random one of its own, made
# once into .env (git- and docker-ignored, read by settings.py and honcho); keeping the file keeps
# sessions valid across restarts. A SECRET_KEY set in the environment wins, and then nothing is written.
secret-key:
	@[ -n "$$SECRET_KEY" ] || grep -qs '^SECRET_KEY=.' .env || { \
	  umask 077; { [ ! -s .env ] || [ -z "$$(tail -c1 .env)" ] || echo >> .env; } \
	  && printf 'SECRET_KEY=%s\n' "$$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))')" >> .env \
	  && echo "Wrote a new random SECRET_KEY to .env"; }

# Pages come through the load balancer on PORT; the web processes listen from PORT + 100 on, and
# SITE_PORT tells them the port browsers see.
run: install secret-key haproxy
	$(PY) manage.py preflight
	@$(MAKE) --no-print-directory rabbitmq-management
	$(PY) manage.py migrate --noinput
	$(PY) manage.py setup_broker
	$(PY) manage.py seed_demo
	$(PY) manage.py collectstatic --noinput --verbosity 0
	@echo "Chat: http://127.0.0.1:$(PORT)/  (staff: http://127.0.0.1:$(PORT)/admin/), $(WEB_CONCURRENCY) web processes"
	SITE_PORT=$${SITE_PORT:-$(PORT)} PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	  $(VENV)/bin/honcho start --port $(PORT) --concurrency web=$(WEB_CONCURRENCY)

test: install secret-key browser promtool docker-compose haproxy
	$(PY) manage.py preflight
	@$(MAKE) --no-print-directory rabbitmq-management
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
