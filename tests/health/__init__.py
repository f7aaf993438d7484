"""Tests of health/: windows and SLA, Ray metrics, the health monitor."""
