import threading
import uuid
from datetime import datetime

import pytest
from django.db import connection

from chat import services
from chat.models import Message, Room
from messaging.events import MESSAGE_CREATED, MessageCreatedPayload
from messaging.models import OutboxEvent


@pytest.mark.django_db(transaction=True)
def test_message_gets_next_seq_per_room(make_user, make_room):
    alice = make_user("alice")
    general, random = make_room("general"), make_room("random")
    seqs = [
        services.message_create(room=room, author=alice, text="hi", client_id=uuid.uuid4()).message.seq
        for room in (general, general, random, general)
    ]
    assert seqs == [1, 2, 1, 3]


@pytest.mark.django_db(transaction=True)
def test_resend_with_same_client_id_returns_original(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    client_id = uuid.uuid4()
    first = services.message_create(room=room, author=alice, text="once", client_id=client_id)
    again = services.message_create(room=room, author=alice, text="once", client_id=client_id)
    assert first.created and not again.created
    assert again.message.id == first.message.id
    assert Message.objects.count() == 1
    assert OutboxEvent.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_leave_no_seq_gaps(make_user, make_room):
    users = [make_user(f"u{i}") for i in range(4)]
    room = make_room("busy")

    def send(user):
        for _ in range(10):
            services.message_create(room=room, author=user, text="x", client_id=uuid.uuid4())
        connection.close()

    threads = [threading.Thread(target=send, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(Message.objects.filter(room=room).values_list("seq", flat=True)) == list(range(1, 41))
    # Stamped once the room's lock is held: in seq order the times never go back.
    times = list(Message.objects.filter(room=room).order_by("seq").values_list("created_at", flat=True))
    assert times == sorted(times)


@pytest.mark.django_db(transaction=True)
def test_rolled_back_message_gives_its_seq_back_and_writes_no_event(make_user, make_room):
    from django.db import transaction

    alice = make_user("alice")
    room = make_room("general")
    with pytest.raises(RuntimeError), transaction.atomic():
        services.message_create(room=room, author=alice, text="lost", client_id=uuid.uuid4())
        raise RuntimeError("the caller's transaction fails")
    kept = services.message_create(room=room, author=alice, text="kept", client_id=uuid.uuid4())
    assert kept.message.seq == 1
    assert OutboxEvent.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_message_writes_outbox_event_in_same_transaction(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    message = services.message_create(room=room, author=alice, text="hi", client_id=uuid.uuid4()).message
    event = OutboxEvent.objects.get()
    assert event.sent_at is None
    assert event.payload["message_id"] == message.id
    assert event.payload["room"] == "general"
    assert event.payload["event_id"] == str(event.event_id)
    assert "text" not in event.payload  # message text stays in the database, not in the broker


@pytest.mark.django_db
def test_returned_message_and_its_event_match_what_is_stored(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    services.message_create(room=room, author=alice, text="first", client_id=uuid.uuid4())

    message = services.message_create(room=room, author=alice, text="second", client_id=uuid.uuid4()).message

    stored = Message.objects.get(pk=message.pk)
    fields = ["id", "room_id", "author_id", "text", "client_id", "seq", "created_at"]
    assert [getattr(message, f) for f in fields] == [getattr(stored, f) for f in fields]
    assert stored.seq == 2 and room.last_seq == 2
    event = OutboxEvent.objects.get(payload__message_id=message.pk)
    payload = dict(event.payload)
    assert datetime.fromisoformat(payload.pop("created_at")) == stored.created_at
    assert payload == {
        "message_id": stored.id,
        "room_id": room.pk,
        "room": "general",
        "author_id": alice.pk,
        "seq": 2,
        "event_id": str(event.event_id),
        "type": "chat.message.created",
    }
    assert (event.routing_key, event.sent_at) == ("chat.message.created", None)


@pytest.mark.django_db
def test_stored_message_created_event_has_exactly_the_declared_fields_and_parses(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")

    message = services.message_create(room=room, author=alice, text="hi", client_id=uuid.uuid4()).message

    event = OutboxEvent.objects.get(payload__message_id=message.pk)
    assert event.routing_key == MESSAGE_CREATED.routing_key
    assert set(event.payload) == set(MessageCreatedPayload.__annotations__)
    [parsed] = MESSAGE_CREATED.parse_batch([event.payload])
    assert (parsed.event_id, parsed.message_id, parsed.room_id, parsed.author_id, parsed.created_at) == (
        event.event_id,
        message.pk,
        room.pk,
        alice.pk,
        message.created_at,
    )


@pytest.mark.django_db
def test_message_to_a_deleted_room_raises_and_stores_nothing(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")
    Room.objects.filter(pk=room.pk).delete()

    with pytest.raises(Room.DoesNotExist):
        services.message_create(room=room, author=alice, text="hello?", client_id=uuid.uuid4())

    assert not Message.objects.exists() and not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_non_member_cannot_post_in_a_private_room_and_nothing_is_stored(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("leads", is_private=True, members=(alice,))

    with pytest.raises(services.MessageNotAllowed):
        services.message_create(room=room, author=bob, text="let me in", client_id=uuid.uuid4())

    assert not Message.objects.exists() and not OutboxEvent.objects.exists()
    assert Room.objects.get(pk=room.pk).last_seq == 0
    assert (
        services.message_create(room=room, author=alice, text="hi", client_id=uuid.uuid4()).message.seq == 1
    )


@pytest.mark.django_db
def test_removed_member_cannot_post_in_a_private_room(make_user, make_room):
    alice = make_user("alice")
    room = make_room("leads", is_private=True, members=(alice,))
    services.message_create(room=room, author=alice, text="before", client_id=uuid.uuid4())

    services.room_member_remove(room=room, user=alice)

    with pytest.raises(services.MessageNotAllowed):
        services.message_create(room=room, author=alice, text="after", client_id=uuid.uuid4())
    assert list(Message.objects.values_list("text", flat=True)) == ["before"]


@pytest.mark.django_db
def test_deactivated_user_cannot_post_even_in_a_public_room(make_user, make_room):
    alice = make_user("alice")
    room = make_room("general")

    services.user_deactivate(user=alice)

    with pytest.raises(services.MessageNotAllowed):
        services.message_create(room=room, author=alice, text="hello?", client_id=uuid.uuid4())
    assert not Message.objects.exists() and not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_non_member_posts_in_a_public_room(make_user, make_room):
    # Membership grants nothing in a public room: the write path follows user_can_read_room.
    alice, bob = make_user("alice"), make_user("bob")
    room = make_room("general", members=(alice,))

    assert services.message_create(room=room, author=bob, text="hi", client_id=uuid.uuid4()).created


@pytest.mark.django_db
def test_room_create_makes_creator_member_and_rejects_duplicates(make_user):
    alice = make_user("alice")
    room = services.room_create(creator=alice, name="Team Leads", is_private=True)
    assert room.slug == "team-leads"
    assert list(room.members.all()) == [alice]
    with pytest.raises(services.InvalidRoom):
        services.room_create(creator=alice, name="team leads")
    with pytest.raises(services.InvalidRoom):
        services.room_create(creator=alice, name="!!!")


@pytest.mark.django_db
def test_room_create_gives_a_name_taken_by_a_hidden_private_room_a_numbered_address(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    make_room("leads", is_private=True, members=(alice,))
    make_room("leads-2")  # a public room with the next address: skipped, not joined

    room = services.room_create(creator=bob, name="Leads")

    assert (room.slug, room.name, room.is_private) == ("leads-3", "Leads", False)
    assert list(room.members.all()) == [bob]


@pytest.mark.django_db
def test_room_create_numbers_a_name_at_the_address_length_limit_within_it(make_user, make_room):
    alice, bob = make_user("alice"), make_user("bob")
    long_name = "x" * 100
    make_room("x" * services.SLUG_MAX_CHARS, is_private=True, members=(alice,))

    room = services.room_create(creator=bob, name=long_name)

    assert room.slug == "x" * (services.SLUG_MAX_CHARS - 2) + "-2"


@pytest.mark.django_db
def test_room_create_names_the_visible_room_a_taken_name_belongs_to(make_user, make_room):
    alice = make_user("alice")
    mine = make_room("leads", is_private=True, members=(alice,))
    public = make_room("general")

    for name, room in (("Leads", mine), ("General!", public)):
        with pytest.raises(services.RoomExists) as raised:
            services.room_create(creator=alice, name=name)
        assert raised.value.room == room
    assert Room.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_creators_of_a_hidden_rooms_name_each_get_their_own_address(make_user, make_room):
    owner = make_user("owner")
    creators = [make_user(f"u{i}") for i in range(4)]
    make_room("leads", is_private=True, members=(owner,))
    start = threading.Barrier(len(creators))
    created: list[Room] = []

    def create(user):
        start.wait()
        created.append(services.room_create(creator=user, name="Leads"))
        connection.close()

    threads = [threading.Thread(target=create, args=(u,)) for u in creators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(room.slug for room in created) == ["leads-2", "leads-3", "leads-4", "leads-5"]
