from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"

    def ready(self) -> None:
        # Connects the receivers that tell open sockets about revoked access.
        from chat import access  # noqa: F401
