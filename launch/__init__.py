"""Command-line entry points (train.py, sweep.py) and the sweep supervisor they share."""
