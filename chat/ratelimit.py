"""Rate limits as token buckets kept in Redis, so they hold across web processes.

One bucket script serves both: a user's messages (the socket, async) and the accounts created
from one client address (the sign-up view, sync).
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.commands.core import AsyncScript, Script

# Refill the bucket for the time passed, then take one token if there is one. Runs
# atomically in Redis, so concurrent sockets of one user cannot both spend the last token.
# Returns 0 when a token was taken, else the milliseconds until the next one.
_TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return wait_ms
"""

# redis.asyncio clients belong to the event loop that created them: one script client per loop.
_scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScript] = weakref.WeakKeyDictionary()


def _take_token_script() -> AsyncScript:
    loop = asyncio.get_running_loop()
    script = _scripts.get(loop)
    if script is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        script = _scripts[loop] = client.register_script(_TAKE_TOKEN)
    return script


@functools.cache
def _take_token_script_sync(redis_url: str) -> Script:
    # One client per Redis for the process: its connection pool serves every request thread.
    return redis.Redis.from_url(redis_url).register_script(_TAKE_TOKEN)


async def take_message_token(user_id: int) -> bool:
    """True when the user may send one more message now (and counts it)."""
    wait_ms = await _take_token_script()(
        keys=[f"{settings.REDIS_KEY_PREFIX}:ratelimit:{user_id}"],
        args=[settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST, time.time()],
    )
    return wait_ms == 0


def take_signup_token(address: str) -> float:
    """0 when one more account may be created from `address` now (and counts it), else seconds to wait.

    SIGNUPS_PER_ADDRESS_PER_HOUR may be spent at once, and come back evenly over the hour; 0 means
    no limit. Raises redis.RedisError when Redis does not answer.
    """
    per_hour = settings.SIGNUPS_PER_ADDRESS_PER_HOUR
    if per_hour <= 0:
        return 0.0
    wait_ms = _take_token_script_sync(settings.REDIS_URL)(
        keys=[f"{settings.REDIS_KEY_PREFIX}:ratelimit:signup:{address}"],
        args=[per_hour / 3600, per_hour, time.time()],
    )
    return wait_ms / 1000
