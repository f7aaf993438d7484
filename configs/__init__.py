"""Pipeline presets shipped as YAML: ``tiny`` (tests, demo), ``small`` (the 25M models), ``base``."""
