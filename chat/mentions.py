"""`@username` mentions: finding them in a message's text and the users they reach."""

from __future__ import annotations

import re

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser

from chat.models import Room

# A mention starts at a word boundary (so `bob@example.com` mentions nobody) and ends with a
# letter or digit, so trailing punctuation ("thanks @alice.") is not part of the name.
MENTION_PATTERN = re.compile(r"(?<![\w@.+-])@([\w.@+-]*\w)")
# One message cannot fan out into an unbounded number of notification tasks.
MAX_MENTIONS_PER_MESSAGE = 20


def mentioned_usernames(text: str) -> list[str]:
    """The distinct usernames `text` mentions, in order of first appearance, at most MAX_MENTIONS."""
    names = dict.fromkeys(MENTION_PATTERN.findall(text))
    return list(names)[:MAX_MENTIONS_PER_MESSAGE]


def mention_recipients(*, text: str, room: Room, author: AbstractBaseUser) -> list[AbstractBaseUser]:
    """The active users `text` mentions who may read `room`, never the author; unknown names are ignored."""
    names = mentioned_usernames(text)
    if not names:
        return []
    user_model = get_user_model()
    users = user_model.objects.filter(**{f"{user_model.USERNAME_FIELD}__in": names}, is_active=True).exclude(
        pk=author.pk
    )
    if room.is_private:
        # Same rule as chat.selectors.user_can_read_room, for many users in one query.
        users = users.filter(rooms=room)
    by_name = {user.get_username(): user for user in users}
    return [by_name[name] for name in names if name in by_name]
