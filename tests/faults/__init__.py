"""Fault injection: processes killed, paused at fault points, cut off from the services they use."""
