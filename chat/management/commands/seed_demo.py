"""`manage.py seed_demo`: demo users and rooms, only into an empty database."""

from django.core.management.base import BaseCommand

from chat.demo import DEMO_ADMIN, DEMO_PASSWORD, demo_data_create, demo_logins_working


class Command(BaseCommand):
    help = "Create demo users, rooms and history when the database has no users."

    def handle(self, *args, **options) -> None:
        if demo_data_create():
            self.stdout.write("Created demo data.")
        else:
            self.stdout.write("Users exist already; demo data not loaded.")
        logins = demo_logins_working()
        if not logins:
            self.stdout.write("No demo logins in this database: log in with an account of your own.")
            return
        names = [f"staff user {name}" if name == DEMO_ADMIN else name for name in logins]
        self.stdout.write(f"Demo logins: {', '.join(names)}; password {DEMO_PASSWORD}")
