"""The coordinator's side: rounds, mergers, emulators, the run directory, the thin ServerApp."""
