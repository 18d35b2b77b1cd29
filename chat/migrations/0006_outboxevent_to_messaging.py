"""OutboxEvent now belongs to messaging (its 0001): chat forgets the model's state; the table stays."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0005_notification_acknowledgement"),
        ("messaging", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="OutboxEvent")],
            database_operations=[],
        ),
    ]
