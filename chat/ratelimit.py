"""Per-user message rate limit: a token bucket kept in Redis, so it holds across web processes."""

from __future__ import annotations

import asyncio
import time
import weakref

import redis.asyncio as aioredis
from django.conf import settings

# Refill the bucket for the time passed, then take one token if there is one. Runs
# atomically in Redis, so concurrent sockets of one user cannot both spend the last token.
_TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return allowed
"""

# redis.asyncio clients belong to the event loop that created them: one per loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def _redis() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aioredis.Redis.from_url(settings.REDIS_URL)
    return client


async def take_message_token(user_id: int) -> bool:
    """True when the user may send one more message now (and counts it)."""
    script = _redis().register_script(_TAKE_TOKEN)
    allowed = await script(
        keys=[f"chat:ratelimit:{user_id}"],
        args=[settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST, time.time()],
    )
    return bool(allowed)
