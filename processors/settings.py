"""Settings of the worker and sink roles, read from ``THROTTLEX_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from throttlex.ingest.settings import ConnectionSettings
from throttlex.processors.accounting.cluster_schema import check_cluster_name


def _default_chdb_dsn() -> str:
    return f"chdb://{Path.cwd() / '.throttlex' / 'chdb'}"


class StreamSettings(ConnectionSettings):
    dead_letter_topic: str = Field("throttlex.events.deadletter", description="where undecodable events go")
    topic_replication_factor: int = Field(1, ge=1, description="replication of topics ThrottleX creates")
    metrics_port: int = Field(9101, ge=0, le=65535, description="port of /metrics for roles without the API (0: off)")


class WorkerSettings(StreamSettings):
    worker_group: str = Field(
        "throttlex-worker", description="Kafka consumer group of the workers; also names their state (changelog) topics"
    )
    policy_file: Path = Field(Path("deploy/config/policies.yaml"), description="YAML file with the policies")
    worker_batch_max_records: int = Field(5_000, ge=1, description="most records a worker takes from Kafka per batch")
    live_flush_interval_s: float = Field(0.5, gt=0, description="how often live usage is written to Redis")
    live_usage_max_pending_keys: int = Field(
        200_000, ge=1, description="most keys whose live usage waits for Redis; past it the oldest wait for their next change"
    )
    worker_session_timeout_s: float = Field(
        10.0, ge=6, description="how long Kafka waits for a silent worker before moving its partitions to others"
    )
    state_flush_interval_s: float = Field(
        1.0, gt=0, description="how often changed state is written to the changelog and the offsets it covers committed"
    )
    state_commit_delay_s: float = Field(
        0.0, ge=0, description="pause between writing a flush's state and committing its offsets; 0 except in crash tests"
    )
    event_time_tolerance_s: float = Field(
        2.0, ge=0, le=300,
        description="how far before Kafka's append time an event may be stamped and still count at its own time; "
        "earlier ones count at that bound, later ones at the append time (docs: time)",
    )  # fmt: skip
    evict_interval_s: float = Field(30.0, gt=0, description="how often the state of idle keys is dropped")
    policy_reload_interval_s: float = Field(1.0, gt=0, description="how often the policy file is checked for changes")

    @property
    def regroup_topic(self) -> str:
        """Internal topic of events regrouped by a limit key other than the API key."""
        return f"{self.events_topic}.regrouped"


class SinkSettings(StreamSettings):
    clickhouse_dsn: str = Field(
        default_factory=_default_chdb_dsn,
        description="chdb:///path for the embedded engine, or http(s)://user:pass@host:8123/db for a server",
    )
    clickhouse_cluster: Annotated[str, AfterValidator(check_cluster_name)] = Field(
        "",
        description="a cluster of the ClickHouse server's remote_servers: the schema is made Replicated and Distributed "
        "on it, every migration ON CLUSTER (docs: clusters); empty for one server or chDB",
    )
    sink_group: str = Field("throttlex-sink", description="Kafka consumer group of the usage sink")
    sink_batch_max_rows: int = Field(
        100_000, ge=1, le=1_000_000,  # below min_insert_block_size_rows: a batch is one block, stored whole or not at all
        description="most records in one batch: one partition's records, stored by one insert",
    )  # fmt: skip
    sink_flush_interval_s: float = Field(1.0, gt=0, description="longest wait before a partial batch is inserted")
    reconcile_interval_s: float = Field(30.0, ge=0, description="how often live counts are checked against ClickHouse (0: never)")
    reconcile_settle_s: float = Field(10.0, ge=0, description="only buckets that ended this long ago are compared")
    reconcile_max_keys: int = Field(500, ge=1, description="most live keys compared per round")
    raw_retention_days: int = Field(0, ge=0, description="days raw events are kept (0: forever); rollups stay")
    sink_commit_delay_s: float = Field(
        0.0, ge=0, description="pause between an insert and its offset commit; 0 except in crash tests"
    )
