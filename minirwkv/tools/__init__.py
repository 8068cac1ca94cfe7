"""Tools around a run: plot.py (the loss curve of a run's log.jsonl)."""
