"""Ray actor agent teams (baking, ADAS, compression) and the Agent actor contract.

The agent runtime (actor contract, teams, coordinator with breakers and recovery) is built in
issue #3; phases 6-8 that need it raise PhaseNotBuiltError until then.
"""
