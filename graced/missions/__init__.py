"""Missions: the state machine (pure) and its store."""
