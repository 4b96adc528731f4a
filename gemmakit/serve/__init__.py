"""Serving: the continuous-batching scheduler (scheduler.py) and the OpenAI-compatible HTTP app (app.py)."""
