"""Per-room and per-user message counts, from the chat.message.created events, each counted once.

It consumes events (tasks.py) and reads chat's rooms; it does not import deadletters, monitoring
or bench.
"""
