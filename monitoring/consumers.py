"""The staff alert socket (/ws/alerts/): pushes `{"type": "alert"}` frames to the banner."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from monitoring.alert_delivery import STAFF_ALERTS_GROUP
from monitoring.selectors import user_sees_alerts

CLOSE_NOT_STAFF = 4403


class StaffAlertConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        if not await database_sync_to_async(user_sees_alerts)(user=self.scope["user"]):
            # Accept first so the client gets the close code instead of a bare handshake failure.
            await self.accept()
            await self.close(code=CLOSE_NOT_STAFF)
            return
        await self.channel_layer.group_add(STAFF_ALERTS_GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "joined", False):
            await self.channel_layer.group_discard(STAFF_ALERTS_GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The socket only pushes; anything a client sends is ignored."""

    async def alert_changed(self, event: dict[str, Any]) -> None:
        """Group event: an alert changed level (alert_delivery.py); forwarded to the banner."""
        await self.send(text_data=json.dumps(event["alert"]))
