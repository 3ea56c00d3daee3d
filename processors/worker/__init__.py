"""The stream worker: reads usage events in batches per partition, applies the policy core, keeps its
state in compacted changelog topics, and writes blocks and live usage to Redis."""
