"""What both sides agree on: the run config, message layouts, update codecs, the split-learning service."""
