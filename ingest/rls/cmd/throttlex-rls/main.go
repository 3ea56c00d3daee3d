// Command throttlex-rls is ThrottleX's rate-limit service for Envoy and the gateways built on it: it
// answers envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit from the denylist the stream workers
// keep in Redis (held in memory, no Redis call per check) and sends one usage event per request to Kafka.
// Configured by THROTTLEX_* environment variables, as the Python roles are: run it with --help.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/denylist"
	"github.com/throttlex/throttlex/ingest/rls/events"
	"github.com/throttlex/throttlex/ingest/rls/keys"
	"github.com/throttlex/throttlex/ingest/rls/redisconn"
	"github.com/throttlex/throttlex/ingest/rls/service"
	"github.com/throttlex/throttlex/ingest/rls/settings"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

const usage = `throttlex-rls: ThrottleX's rate-limit service for Envoy (gRPC ShouldRateLimit).

It answers every check from memory: the blocks the stream workers publish to Redis, and the API keys the
registry publishes there; and it sends one usage event per request to the events topic in Kafka.

Settings (environment variables, shared with the Python roles where they mean the same):
  THROTTLEX_RLS_GRPC_ADDR            where Envoy calls (default 0.0.0.0:8081; gRPC health on the same port)
  THROTTLEX_RLS_METRICS_ADDR         Prometheus /metrics (default 0.0.0.0:9102; empty: none)
  THROTTLEX_RLS_DESCRIPTORS          descriptor entry=role pairs on top of the defaults (see docs/envoy.md)
  THROTTLEX_RLS_REQUEST_ID_WINDOW_S  how long a request id is remembered, so it is accounted once (60)
  THROTTLEX_GATEWAY_NAME             this service's name on its events: source rls:<name> (host name)
  THROTTLEX_REDIS_URL, THROTTLEX_REDIS_PREFIX, THROTTLEX_REDIS_TIMEOUT_S
  THROTTLEX_KAFKA_BOOTSTRAP, THROTTLEX_KAFKA_SECURITY_PROTOCOL, THROTTLEX_KAFKA_SASL_MECHANISM,
  THROTTLEX_KAFKA_SASL_USERNAME, THROTTLEX_KAFKA_SASL_PASSWORD, THROTTLEX_KAFKA_SSL_CAFILE,
  THROTTLEX_EVENTS_TOPIC, THROTTLEX_PRODUCER_LINGER_MS, THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS
  THROTTLEX_KEY_SALT                 the deployment's secret salt (the same as the API's and gateways')
  THROTTLEX_EDGE_KEYS                registry (only registered, active keys pass) or any
  THROTTLEX_TENANT                   tenant of events when THROTTLEX_EDGE_KEYS=any (default)
  THROTTLEX_TRUSTED_PROXIES          proxies whose X-Forwarded-For is believed (needs the x-forwarded-for entry)
  THROTTLEX_EDGE_FAIL_MODE           open or closed, once Redis is out of reach THROTTLEX_EDGE_FAIL_AFTER_S (5)
  THROTTLEX_EDGE_RESYNC_INTERVAL_S   how often the denylist is reread while connected (5)
  THROTTLEX_LOG_LEVEL                DEBUG, INFO, WARNING or ERROR
`

func main() {
	flag.Usage = func() { fmt.Fprint(flag.CommandLine.Output(), usage) }
	flag.Parse()
	slog.SetDefault(slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()})).With("role", "rls"))
	s, err := settings.FromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "throttlex-rls:", err)
		os.Exit(2)
	}
	if err := run(s); err != nil {
		fmt.Fprintln(os.Stderr, "throttlex-rls:", err)
		os.Exit(1)
	}
}

func logLevel() slog.Level {
	switch os.Getenv("THROTTLEX_LOG_LEVEL") {
	case "DEBUG":
		return slog.LevelDebug
	case "WARNING":
		return slog.LevelWarn
	case "ERROR":
		return slog.LevelError
	}
	return slog.LevelInfo
}

func wallClockMS() int64 { return time.Now().UnixMilli() }

func run(s settings.Settings) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	client, err := redisconn.Connect(s.RedisURL, s.RedisTimeout)
	if err != nil {
		return err
	}
	defer client.Close()
	clients, err := contract.NewClientAddress(s.TrustedProxies)
	if err != nil {
		return fmt.Errorf("THROTTLEX_TRUSTED_PROXIES: %w", err)
	}
	var cache *denylist.Cache
	var producer *events.Producer
	metrics := stats.New(func() float64 { return cache.AgeSeconds() }, func() float64 { return float64(producer.Buffered()) })
	cache = denylist.NewCache(wallClockMS, s.FailMode == "open", s.FailAfter, metrics)
	if producer, err = events.NewProducer(s, metrics); err != nil {
		return err
	}
	defer producer.Close(30 * time.Second)

	follower := &denylist.Follower{Cache: cache, Client: client, Prefix: s.RedisPrefix, Silence: time.Second,
		ResyncInterval: s.ResyncInterval, ReconnectDelay: 500 * time.Millisecond, Synced: make(chan struct{})}
	go follower.Run(ctx)
	svc := &service.Service{Denylist: cache, Events: producer, Mapping: s.Descriptors, Clients: clients,
		Salt: s.KeySalt, Tenant: s.Tenant, Source: "rls:" + s.Name, Now: wallClockMS, Metrics: metrics,
		Seen: service.NewRequestIDs(s.RequestWindow, 250_000, time.Now)} // 16-byte digests: a few tens of MB at most
	if s.EdgeKeys == "registry" {
		keyCache := keys.NewCache(client, s.RedisPrefix, wallClockMS, s.UnknownKeyTTL, 100_000, metrics)
		go keyCache.Follow(ctx, time.Second, 500*time.Millisecond)
		svc.Keys = keyCache
	}
	select {
	case <-follower.Synced:
	case <-time.After(5 * time.Second):
		slog.Warn("denylist not synchronised yet; serving, and admitting until it is")
	case <-ctx.Done():
		return nil
	}

	listener, err := net.Listen("tcp", s.GRPCAddr)
	if err != nil {
		return fmt.Errorf("THROTTLEX_RLS_GRPC_ADDR %s: %w", s.GRPCAddr, err)
	}
	server := grpc.NewServer(grpc.ForceServerCodecV2(service.NewCodec()))
	ratelimitv3.RegisterRateLimitServiceServer(server, svc)
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(server, healthServer)
	healthServer.SetServingStatus(ratelimitv3.RateLimitService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	var metricsServer *http.Server
	if s.MetricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
		metricsServer = &http.Server{Addr: s.MetricsAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := metricsServer.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				slog.Error("metrics endpoint failed", "error", err.Error())
			}
		}()
	}
	slog.Info("serving", "grpc", listener.Addr().String(), "metrics", s.MetricsAddr, "keys", s.EdgeKeys)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	select {
	case err := <-served:
		return fmt.Errorf("gRPC server: %w", err)
	case <-ctx.Done():
	}
	slog.Info("stopping")
	healthServer.Shutdown() // NOT_SERVING: Envoy's health checks move traffic away
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		server.Stop()
	}
	if metricsServer != nil {
		_ = metricsServer.Close()
	}
	return nil
}
