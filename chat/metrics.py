"""The chat's own instruments: messages stored and frames refused by the rate limit.

Counted in the process where it happens; /metrics serves them (monitoring/ lists every name).
"""

from __future__ import annotations

from prometheus_client import Counter

CHAT_MESSAGES_STORED = Counter(
    "chat_messages_stored",
    "Chat messages committed to the database (a resend of a stored message is not counted).",
)
CHAT_RATE_LIMITED_FRAMES = Counter(
    "chat_rate_limited_frames",
    "Message frames refused because the sender exceeded the per-user rate limit.",
)
