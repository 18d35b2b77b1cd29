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


def demo_data_create() -> bool:
    """Create the demo users, rooms and history when there are no users yet; True if created."""
    User = get_user_model()
    if User.objects.exists():
        return False
    with transaction.atomic():
        users = {name: User.objects.create_user(name, password=DEMO_PASSWORD) for name in DEMO_USERS}
        users[DEMO_ADMIN] = User.objects.create_superuser(DEMO_ADMIN, password=DEMO_PASSWORD)
        services.room_create(creator=users["alice"], name="General")
        services.room_create(creator=users["carol"], name="Random")
        leads = services.room_create(creator=users["alice"], name="Leads", is_private=True)
        leads.members.add(users["bob"])
    for author, slug, text in _HISTORY:
        room = Room.objects.get(slug=slug)
        services.message_create(room=room, author=users[author], text=text, client_id=uuid.uuid4())
    return True
