"""Metrics, alerts and the staff banner: it watches every other app's tables, queues and processes.

It may import the apps below it (analytics, deadletters, chat, messaging); only configuration
(chatproject) and bench import it.
"""
