"""Which users have an open socket, across every web process: a Redis sorted set per user.

Each open socket is a member (its channel name) scored with the time of its last heartbeat.
A socket adds itself on connect, refreshes its score every PRESENCE_HEARTBEAT_SECONDS and
removes itself on disconnect; a process that crashes cannot remove its sockets, so readers
only count members seen within PRESENCE_TTL_SECONDS and stale ones age out on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis
import redis.asyncio
from django.conf import settings

_sync_client: redis.Redis | None = None

logger = logging.getLogger(__name__)


def key_prefix() -> str:
    """Every presence key starts with this (settings.REDIS_KEY_PREFIX keeps installations apart)."""
    return f"{settings.REDIS_KEY_PREFIX}:presence:user:"


def _key(user_id: int) -> str:
    return f"{key_prefix()}{user_id}"


def _async_client() -> redis.asyncio.Redis:
    # One client per event loop would be needed to share it; a socket's life is long, the cost small.
    return redis.asyncio.Redis.from_url(settings.REDIS_URL)


async def presence_socket_open(*, user_id: int, channel_name: str) -> None:
    """Called when a socket is accepted: the user counts as online from now on."""
    await _touch(user_id, channel_name)


async def presence_heartbeat(*, user_id: int, channel_name: str) -> None:
    """Runs for the socket's lifetime (cancelled on disconnect), keeping its entry fresh."""
    while True:
        await asyncio.sleep(settings.PRESENCE_HEARTBEAT_SECONDS)
        try:
            await _touch(user_id, channel_name)
        except redis.RedisError as error:
            # A Redis blip must not end the heartbeat: the socket would stop counting as online.
            logger.warning("presence heartbeat failed (%s); retrying at the next beat", type(error).__name__)


async def presence_socket_close(*, user_id: int, channel_name: str) -> None:
    """Called on disconnect; a crashed process never calls it, hence the TTL."""
    client = _async_client()
    try:
        await client.zrem(_key(user_id), channel_name)
    finally:
        await client.aclose()


async def _touch(user_id: int, channel_name: str) -> None:
    client = _async_client()
    try:
        key = _key(user_id)
        now = time.time()
        async with client.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {channel_name: now})
            pipe.zremrangebyscore(key, "-inf", now - settings.PRESENCE_TTL_SECONDS)
            # The whole key goes when its last socket has been silent for the TTL.
            pipe.expire(key, int(settings.PRESENCE_TTL_SECONDS) + 1)
            await pipe.execute()
    finally:
        await client.aclose()


def user_open_sockets(*, user_id: int) -> int:
    """How many sockets the user has open right now (heartbeat within the TTL), from any process."""
    global _sync_client
    if _sync_client is None:
        _sync_client = redis.Redis.from_url(settings.REDIS_URL)
    return _sync_client.zcount(_key(user_id), time.time() - settings.PRESENCE_TTL_SECONDS, "+inf")
