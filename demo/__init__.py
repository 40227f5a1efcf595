"""`make demo`: the whole life of a checkpoint, end to end (``python demo/run.py``); not part of the wheel."""
