"""OutboxEvent moves here from chat: the model's state only; its table, chat_outboxevent, stays.

The content type is renamed rather than recreated, so its id, and the permissions that point to
it, stay the same on a database migrated before the move.
"""

from django.db import migrations, models


def content_type_to_messaging(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    ContentType.objects.filter(app_label="chat", model="outboxevent").update(app_label="messaging")


def content_type_to_chat(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    ContentType.objects.filter(app_label="messaging", model="outboxevent").update(app_label="chat")


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("chat", "0005_notification_acknowledgement"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="OutboxEvent",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("event_id", models.UUIDField(unique=True)),
                        ("routing_key", models.CharField(max_length=100)),
                        ("payload", models.JSONField()),
                        ("priority", models.PositiveSmallIntegerField(default=0)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("sent_at", models.DateTimeField(blank=True, null=True)),
                    ],
                    options={
                        "db_table": "chat_outboxevent",
                        "indexes": [
                            models.Index(
                                condition=models.Q(("sent_at__isnull", True)), fields=["id"], name="outbox_pending_idx"
                            ),
                            models.Index(fields=["sent_at"], name="outbox_sent_at_idx"),
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(content_type_to_messaging, content_type_to_chat),
    ]
