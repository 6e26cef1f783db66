"""The pipeline: the one command (reproduce.py), its launchers, profiles and merge tables."""
