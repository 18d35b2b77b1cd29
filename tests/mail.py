"""Mail sent by child processes (the notifier), read back through Django's file-based backend.

Django's locmem backend keeps mail in the sending process; a test that needs another process's
mail gives it `file_email_env(directory)` and reads `sent_emails(directory)`.
"""

from __future__ import annotations

import email
from email.message import Message
from pathlib import Path

# The file-based backend ends every message with a line of 79 dashes.
_SEPARATOR = "\n" + "-" * 79 + "\n"


def file_email_env(directory: Path) -> dict[str, str]:
    """Environment for a child process whose mail is written as files into `directory`."""
    # Four slashes for an absolute directory: django-environ drops the first one of the path.
    return {"EMAIL_URL": f"filemail:///{directory.resolve()}"}


def sent_emails(directory: Path) -> list[Message]:
    """Every complete message written into `directory` so far, oldest file first."""
    messages = []
    for path in sorted(directory.glob("*.log")):
        *complete, _rest = path.read_text().split(_SEPARATOR)
        messages.extend(email.message_from_string(text) for text in complete)
    return messages
