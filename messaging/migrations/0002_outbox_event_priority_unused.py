"""OutboxEvent.priority leaves the model: a VIP's mention is routed by its routing key now, and no
queue has priorities (messaging/topology.py).

The column stays in the table for now, with a default, so that a web process of the previous
release, still inserting it while a deploy replaces it, keeps storing messages; a later
migration drops it.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("messaging", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.RemoveField(model_name="outboxevent", name="priority")],
            database_operations=[
                migrations.RunSQL(
                    "ALTER TABLE chat_outboxevent ALTER COLUMN priority SET DEFAULT 0",
                    reverse_sql="ALTER TABLE chat_outboxevent ALTER COLUMN priority DROP DEFAULT",
                )
            ],
        ),
    ]
