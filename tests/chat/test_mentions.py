"""Finding `@username` mentions and the users they reach (chat/mentions.py)."""

from __future__ import annotations

import pytest

from chat.mentions import mention_recipients, mentioned_usernames

pytestmark = pytest.mark.django_db


def test_mentioned_usernames_are_distinct_and_in_order():
    assert mentioned_usernames("@bob and @alice, then @bob again") == ["bob", "alice"]


def test_email_addresses_and_trailing_punctuation_are_not_mentions():
    assert mentioned_usernames("write to carol@example.com, thanks @alice.") == ["alice"]


def test_only_users_who_may_read_a_private_room_are_mentioned(make_user, make_room):
    alice, bob, _carol = make_user("alice"), make_user("bob"), make_user("carol")
    room = make_room("secret", is_private=True, members=(alice, bob))
    recipients = mention_recipients(text="@bob @carol look", room=room, author=alice)
    assert recipients == [bob]


def test_everyone_may_be_mentioned_in_a_public_room(make_user, make_room):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    room = make_room("general")
    assert mention_recipients(text="@carol @bob", room=room, author=alice) == [carol, bob]


def test_the_author_is_not_mentioned_by_their_own_message(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    assert mention_recipients(text="note to self @alice", room=room, author=alice) == []


def test_unknown_and_inactive_names_are_ignored(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_user("gone", is_active=False)
    room = make_room("general")
    assert mention_recipients(text="@nobody @gone @bob", room=room, author=alice) == [bob]
