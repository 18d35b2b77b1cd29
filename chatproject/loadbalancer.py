"""The load balancer process (`python -m chatproject.loadbalancer`, the Procfile's `lb`): HAProxy
on HOST:PORT in front of the web processes.

It writes HAProxy's config from ops/haproxy/haproxy.cfg.template and the settings (which web
processes, where) into LOADBALANCER_RUN_DIR, then becomes HAProxy (exec), so that a process
manager's signals reach HAProxy itself. The generated file is rewritten at every start: changing
WEB_CONCURRENCY means restarting `lb` with it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from chatproject.startup import settings_load_or_exit

TEMPLATE = Path(__file__).resolve().parent.parent / "ops" / "haproxy" / "haproxy.cfg.template"
# Debian installs it here, outside a non-root user's PATH.
HAPROXY_FALLBACK = "/usr/sbin/haproxy"
HAPROXY_MISSING = "HAProxy is not installed: run 'make haproxy' as root, or 'sudo apt-get install -y haproxy'"


class LoadBalancerConfigError(ValueError):
    """A setting the load balancer cannot use; the message says which and why."""


def haproxy_config(
    *,
    bind: str,
    servers: list[str],
    servers_dns: str,
    concurrency: int,
    check_uri: str,
    check_host: str,
    admin_socket: Path,
) -> str:
    """HAProxy's config: `servers` (`host:port` each), or up to `concurrency` addresses of the DNS
    name `servers_dns` (`name:port`) when it is set."""
    if servers_dns:
        _address_check(servers_dns, "WEB_SERVERS_DNS")
        resolvers = "\nresolvers system\n    parse-resolv-conf\n    hold valid 5s\n"
        server_lines = (
            f"    server-template web 1-{concurrency} {servers_dns} resolvers system init-addr none"
        )
    else:
        if not servers:
            raise LoadBalancerConfigError("WEB_SERVERS is empty: list the web processes as host:port")
        for address in servers:
            _address_check(address, "WEB_SERVERS")
        resolvers = ""
        server_lines = "\n".join(f"    server web{n} {address}" for n, address in enumerate(servers, 1))
    return Template(TEMPLATE.read_text()).substitute(
        bind=bind,
        servers=server_lines,
        resolvers=resolvers,
        check_uri=check_uri,
        check_host=check_host,
        admin_socket=admin_socket,
    )


def _address_check(address: str, setting: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LoadBalancerConfigError(f"{setting} holds {address!r}: each entry must be host:port")


def haproxy_path() -> str | None:
    found = shutil.which("haproxy")
    if found:
        return found
    return HAPROXY_FALLBACK if os.access(HAPROXY_FALLBACK, os.X_OK) else None


def main() -> None:
    settings_load_or_exit()
    import django

    django.setup()  # the health check's URI is the monitoring app's
    from django.conf import settings

    from monitoring.views import LOAD_BALANCER_CHECK_URI

    haproxy = haproxy_path()
    if haproxy is None:
        sys.exit(HAPROXY_MISSING)
    run_dir = settings.LOADBALANCER_RUN_DIR
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        config = haproxy_config(
            bind=f"{settings.HOST}:{settings.PORT}",
            servers=settings.WEB_SERVERS,
            servers_dns=settings.WEB_SERVERS_DNS,
            concurrency=settings.WEB_CONCURRENCY,
            check_uri=LOAD_BALANCER_CHECK_URI,
            # A host the web processes accept (ALLOWED_HOSTS): the site's own.
            check_host=urlsplit(settings.SITE_URL).hostname or "localhost",
            admin_socket=run_dir / "admin.sock",
        )
    except LoadBalancerConfigError as error:
        sys.exit(str(error))
    path = run_dir / "haproxy.cfg"
    path.write_text(config)
    os.execv(haproxy, [haproxy, "-db", "-f", str(path)])


if __name__ == "__main__":
    main()
