"""The policy core: what a policy is, window arithmetic, the engine that applies policies to events,
and dry-runs. Pure: no I/O, no clock, no logging; every instant comes from the events."""
