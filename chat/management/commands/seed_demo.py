"""`manage.py seed_demo`: demo users and rooms, only into an empty database."""

from django.core.management.base import BaseCommand

from chat.demo import DEMO_ADMIN, DEMO_PASSWORD, DEMO_USERS, demo_data_create


class Command(BaseCommand):
    help = "Create demo users, rooms and history when the database has no users."

    def handle(self, *args, **options) -> None:
        if demo_data_create():
            self.stdout.write("Created demo data.")
        else:
            self.stdout.write("Users exist already; demo data not loaded.")
        logins = ", ".join(DEMO_USERS)
        self.stdout.write(f"Demo logins: {logins} (and staff user {DEMO_ADMIN}), password {DEMO_PASSWORD}")
