"""gracectl: the command line to watch and steer graced."""
