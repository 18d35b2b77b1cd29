"""Plumbing for the backing services that no app owns: raw PostgreSQL (chunked deletes, the LISTEN
connection), the bounded database thread pools, service reachability, the metrics HTTP server,
whether this process is shutting down.

It sits below every app and imports none of them.
"""
