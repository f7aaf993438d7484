"""Tests of actors/: the Agent actor contract and the role registry."""
