"""Tests of the plain-PyTorch phases (no Ray): data layer and Phase 1 (Cognate)."""
