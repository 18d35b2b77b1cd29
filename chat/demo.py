"""Demo data for a fresh installation: a few users, rooms and some history."""

from __future__ import annotations

import uuid

from django.contrib.auth import get_user_model
from django.db import transaction

from chat import services
from chat.models import Room

DEMO_PASSWORD = "chat-demo-2026"
DEMO_USERS = ["alice", "bob", "carol"]
DEMO_ADMIN = "admin"
_HISTORY = [
    ("alice", "general", "Morning all! The new chat is live."),
    ("bob", "general", "Nice. Does it keep history?"),
    ("alice", "general", "Every message is stored before anyone sees it."),
    ("carol", "random", "Anyone up for lunch?"),
    ("bob", "leads", "Private room: only alice and I can read this."),
]


def demo_email(username: str) -> str:
    """The demo user's address: at example.com, a domain reserved for examples."""
    return f"{username}@example.com"


def demo_data_create() -> bool:
    """Create the demo users, rooms and history when there are no users yet; True if created."""
    User = get_user_model()
    if User.objects.exists():
        return False
    with transaction.atomic():
        # Addresses at example.com (reserved, never delivered), so the mention emails of users who
        # are not online can be seen with the demo data, e.g. with EMAIL_URL=consolemail:// .
        users = {
            name: User.objects.create_user(name, email=demo_email(name), password=DEMO_PASSWORD)
            for name in DEMO_USERS
        }
        users[DEMO_ADMIN] = User.objects.create_superuser(
            DEMO_ADMIN, email=demo_email(DEMO_ADMIN), password=DEMO_PASSWORD
        )
        services.room_create(creator=users["alice"], name="General")
        services.room_create(creator=users["carol"], name="Random")
        leads = services.room_create(creator=users["alice"], name="Leads", is_private=True)
        leads.members.add(users["bob"])
    for author, slug, text in _HISTORY:
        room = Room.objects.get(slug=slug)
        services.message_create(room=room, author=users[author], text=text, client_id=uuid.uuid4())
    return True


def demo_logins_working() -> list[str]:
    """The demo usernames that exist, are active and still have DEMO_PASSWORD, in DEMO_USERS order.

    `seed_demo` prints only these: on a database it did not fill, the demo names may belong to
    real people with passwords of their own, or not exist at all.
    """
    users = get_user_model().objects.filter(username__in=[*DEMO_USERS, DEMO_ADMIN], is_active=True)
    working = {user.get_username() for user in users if user.check_password(DEMO_PASSWORD)}
    return [name for name in (*DEMO_USERS, DEMO_ADMIN) if name in working]
