"""Work that failed for good: the archiver stores every dead letter, staff inspect and replay them.

It consumes the dead-letter queue and replays through messaging; it does not import analytics,
monitoring or bench.
"""
