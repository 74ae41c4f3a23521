"""What a run leaves behind: atomic files, checkpoints, plots, and the trackers (loggers and their artifacts)."""
