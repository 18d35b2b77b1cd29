"""Per-user message rate limit: a token bucket kept in Redis, so it holds across web processes."""

from __future__ import annotations

import asyncio
import time
import weakref

import redis.asyncio as aioredis
from django.conf import settings
from redis.commands.core import AsyncScript

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

# redis.asyncio clients belong to the event loop that created them: one script client per loop.
_scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScript] = weakref.WeakKeyDictionary()


def _take_token_script() -> AsyncScript:
    loop = asyncio.get_running_loop()
    script = _scripts.get(loop)
    if script is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        script = _scripts[loop] = client.register_script(_TAKE_TOKEN)
    return script


async def take_message_token(user_id: int) -> bool:
    """True when the user may send one more message now (and counts it)."""
    allowed = await _take_token_script()(
        keys=[f"{settings.REDIS_KEY_PREFIX}:ratelimit:{user_id}"],
        args=[settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST, time.time()],
    )
    return bool(allowed)
