"""The `VIP` group exists from the start, so staff only add members to it in the admin."""

from django.db import migrations

VIP_GROUP = "VIP"  # chat.selectors.VIP_GROUP; a migration must not import app code


def create_vip_group(apps, schema_editor) -> None:
    apps.get_model("auth", "Group").objects.get_or_create(name=VIP_GROUP)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("chat", "0002_notification_delivery"),
    ]

    operations = [migrations.RunPython(create_vip_group, migrations.RunPython.noop)]
