// Package stats declares every metric throttlex-rls exports, in one place.
package stats

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the service's Prometheus metrics, registered on one registry.
type Metrics struct {
	Registry       *prometheus.Registry
	Checks         *prometheus.CounterVec // by outcome
	CheckSeconds   prometheus.Histogram
	DenylistAge    prometheus.GaugeFunc
	DenylistSize   prometheus.Gauge
	RedisErrors    *prometheus.CounterVec // by kind
	Emitted        prometheus.Counter
	Produced       prometheus.Counter
	Dropped        prometheus.Counter
	Failed         *prometheus.CounterVec // by reason
	Buffered       prometheus.GaugeFunc
	KeyLookups     *prometheus.CounterVec // by where the answer came from
	RepeatedChecks prometheus.Counter
	IgnoredEntries *prometheus.CounterVec // by entry key
}

// Outcomes of a check, the label values of throttlex_rls_checks_total.
const (
	Admitted    = "admitted"
	Blocked     = "blocked"
	Shadow      = "shadow"
	Unknown     = "unknown_key"
	Unavailable = "refused_unavailable"
	NoKey       = "unauthenticated"
	KeyCheck    = "key_check_unavailable"
	BadRequest  = "bad_request"
)

// New registers the metrics; denylistAge and buffered are read at each scrape.
func New(denylistAge func() float64, buffered func() float64) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "throttlex_rls_checks_total", Help: "ShouldRateLimit calls answered, by outcome",
		}, []string{"outcome"}),
		CheckSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "throttlex_rls_check_seconds", Help: "time spent answering one ShouldRateLimit call",
			Buckets: []float64{10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 25e-3},
		}),
		DenylistAge: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "throttlex_rls_denylist_age_seconds",
			Help: "time since the denylist was last known complete (a snapshot, or a message on a live subscription)",
		}, denylistAge),
		DenylistSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "throttlex_rls_denylist_blocks", Help: "blocks held in memory",
		}),
		RedisErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "throttlex_rls_redis_errors_total", Help: "Redis failures of the denylist and key followers, by kind",
		}, []string{"kind"}),
		Emitted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "throttlex_rls_events_emitted_total", Help: "usage events made by checks, before Kafka has them",
		}),
		Produced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "throttlex_rls_events_produced_total", Help: "usage events Kafka acknowledged",
		}),
		Dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "throttlex_rls_events_dropped_total", Help: "usage events dropped because the buffer was full",
		}),
		Failed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "throttlex_rls_events_failed_total", Help: "usage events Kafka refused for good, by reason",
		}, []string{"reason"}),
		Buffered: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "throttlex_rls_events_buffered", Help: "usage events waiting for Kafka's acknowledgement",
		}, buffered),
		KeyLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "throttlex_rls_key_lookups_total", Help: "API key checks, by where the answer came from",
		}, []string{"source"}),
		RepeatedChecks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "throttlex_rls_repeated_checks_total",
			Help: "calls for a request id already seen: answered, not accounted again",
		}),
		IgnoredEntries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "throttlex_rls_descriptor_entries_ignored_total",
			Help: "descriptor entries whose key THROTTLEX_RLS_DESCRIPTORS does not map, by key",
		}, []string{"key"}),
	}
	m.Registry.MustRegister(m.Checks, m.CheckSeconds, m.DenylistAge, m.DenylistSize, m.RedisErrors, m.Emitted, m.Produced,
		m.Dropped, m.Failed, m.Buffered, m.KeyLookups, m.RepeatedChecks, m.IgnoredEntries)
	return m
}
