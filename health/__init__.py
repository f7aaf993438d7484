"""Health monitoring: heartbeats, SLA accounting, ray.util.metrics, health reports (issue #3)."""
