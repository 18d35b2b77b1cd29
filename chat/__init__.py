"""Rooms, messages and the room socket: accounts, access, mentions and their notifications.

A message and its outbox event are stored here in one statement (services.message_create); from
there messaging/ carries the event. It imports messaging and infrastructure only, never the apps
that consume its events (analytics, deadletters, monitoring).
"""
