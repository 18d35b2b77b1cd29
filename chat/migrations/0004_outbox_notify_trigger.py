"""PostgreSQL itself sends the relay's NOTIFY when outbox rows are inserted.

The message write holds its room's row lock until commit; a separate `NOTIFY` statement was one
more round trip inside that window for every message, and every writer of the room waited for it.
A statement-level trigger runs inside the INSERT: no extra round trip, one NOTIFY per statement
(bulk inserts too), still delivered only if and when the transaction commits.
"""

from django.db import migrations

OUTBOX_NOTIFY_CHANNEL = "chat_outbox"  # messaging.outbox.OUTBOX_NOTIFY_CHANNEL; a migration must not import app code

CREATE = f"""
CREATE FUNCTION chat_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{OUTBOX_NOTIFY_CHANNEL}', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER chat_outbox_notify AFTER INSERT ON chat_outboxevent
    FOR EACH STATEMENT EXECUTE FUNCTION chat_outbox_notify();
"""

DROP = """
DROP TRIGGER chat_outbox_notify ON chat_outboxevent;
DROP FUNCTION chat_outbox_notify();
"""


class Migration(migrations.Migration):
    dependencies = [("chat", "0003_vip_group")]

    operations = [migrations.RunSQL(CREATE, DROP)]
