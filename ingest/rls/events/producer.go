// Package events sends one usage event per check to the events topic, as the Python gateway's producer
// does (ingest.producer): keyed by the API key id and partitioned with Kafka's murmur2 (franz-go's sticky
// key partitioner places keyed records as the Java client and librdkafka's murmur2_random do), idempotent,
// acks=all, lz4 batches, and no delivery timeout: while Kafka is out of reach events wait in the buffer.
// A check never waits on Kafka: past the buffer's bound an event is dropped and counted.
package events

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/settings"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

// Producer hands events to Kafka.
type Producer struct {
	client   *kgo.Client
	metrics  *stats.Metrics
	dropping atomic.Bool
}

// NewProducer connects lazily: nothing is dialled until the first event.
func NewProducer(s settings.Settings, metrics *stats.Metrics) (*Producer, error) {
	options := []kgo.Opt{
		kgo.SeedBrokers(s.KafkaBootstrap...),
		kgo.DefaultProduceTopic(s.EventsTopic),
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
		kgo.RequiredAcks(kgo.AllISRAcks()), // with the idempotent producer, franz-go's default
		kgo.ProducerLinger(s.ProducerLinger),
		kgo.ProducerBatchCompression(kgo.Lz4Compression()),
		kgo.MaxBufferedRecords(s.ProducerBufferMax),
		kgo.WithLogger(kgoLogger{}),
	}
	security, err := securityOptions(s)
	if err != nil {
		return nil, err
	}
	client, err := kgo.NewClient(append(options, security...)...)
	if err != nil {
		return nil, fmt.Errorf("kafka client: %w", err)
	}
	return &Producer{client: client, metrics: metrics}, nil
}

func securityOptions(s settings.Settings) ([]kgo.Opt, error) {
	var options []kgo.Opt
	if s.KafkaProtocol == "SSL" || s.KafkaProtocol == "SASL_SSL" {
		config := &tls.Config{MinVersion: tls.VersionTLS12}
		if s.KafkaCAFile != "" {
			pem, err := os.ReadFile(s.KafkaCAFile)
			if err != nil {
				return nil, fmt.Errorf("THROTTLEX_KAFKA_SSL_CAFILE: %w", err)
			}
			config.RootCAs = x509.NewCertPool()
			if !config.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("THROTTLEX_KAFKA_SSL_CAFILE: no PEM certificate in %s", s.KafkaCAFile)
			}
		}
		options = append(options, kgo.DialTLSConfig(config))
	}
	if s.KafkaProtocol == "SASL_PLAINTEXT" || s.KafkaProtocol == "SASL_SSL" {
		var mechanism sasl.Mechanism
		switch s.KafkaMechanism {
		case "PLAIN":
			mechanism = plain.Auth{User: s.KafkaUsername, Pass: s.KafkaPassword}.AsMechanism()
		case "SCRAM-SHA-256":
			mechanism = scram.Auth{User: s.KafkaUsername, Pass: s.KafkaPassword}.AsSha256Mechanism()
		case "SCRAM-SHA-512":
			mechanism = scram.Auth{User: s.KafkaUsername, Pass: s.KafkaPassword}.AsSha512Mechanism()
		}
		options = append(options, kgo.SASL(mechanism))
	}
	return options, nil
}

// Emit queues one event; it never waits.
func (p *Producer) Emit(event *contract.Event) {
	p.metrics.Emitted.Inc()
	value, err := event.Encode()
	if err != nil {
		p.metrics.Failed.WithLabelValues("encode").Inc()
		return
	}
	p.client.TryProduce(context.Background(), &kgo.Record{Key: []byte(event.APIKeyID), Value: value}, p.delivered)
}

func (p *Producer) delivered(_ *kgo.Record, err error) {
	switch {
	case err == nil:
		p.metrics.Produced.Inc()
		if p.dropping.CompareAndSwap(true, false) {
			slog.Warn("producer buffer has room again: dropping stopped")
		}
	case errors.Is(err, kgo.ErrMaxBuffered):
		p.metrics.Dropped.Inc()
		if p.dropping.CompareAndSwap(false, true) {
			slog.Warn("producer buffer full: dropping usage events until Kafka takes the buffered ones")
		}
	default:
		p.metrics.Failed.WithLabelValues(reason(err)).Inc()
		slog.Warn("usage event not delivered", "error", err.Error())
	}
}

func reason(err error) string {
	if errors.Is(err, context.Canceled) || errors.Is(err, kgo.ErrClientClosed) {
		return "stopped"
	}
	return "kafka"
}

// Buffered is the number of events waiting for Kafka's acknowledgement.
func (p *Producer) Buffered() int64 { return p.client.BufferedProduceRecords() }

// Close delivers what is buffered, waiting at most timeout, then closes the client.
func (p *Producer) Close(timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := p.client.Flush(ctx); err != nil {
		slog.Error("stopping with events Kafka has not confirmed", "events", p.Buffered())
	}
	p.client.Close()
}

type kgoLogger struct{}

func (kgoLogger) Level() kgo.LogLevel { return kgo.LogLevelWarn }

func (kgoLogger) Log(level kgo.LogLevel, msg string, keyvals ...any) {
	if level == kgo.LogLevelError {
		slog.Error(msg, append([]any{"component", "kafka"}, keyvals...)...)
		return
	}
	slog.Warn(msg, append([]any{"component", "kafka"}, keyvals...)...)
}
