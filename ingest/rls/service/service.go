// Package service answers Envoy's ShouldRateLimit from memory: the API key from the key cache, the blocks
// in force from the denylist cache. Neither makes a Redis call for a key seen before, and the usage event
// of the check is queued for Kafka without waiting. Where the answer differs from the Python middleware's
// (the RLS API knows no 401 or 503), docs/envoy.md says so.
package service

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/descriptors"
	"github.com/throttlex/throttlex/ingest/rls/keys"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

// Denylist is what a check asks of the denylist cache.
type Denylist interface {
	Check(values map[string]string) (contract.Block, bool)
	Refusing() bool
}

// Keys is what a check asks of the key cache; nil: every key passes (THROTTLEX_EDGE_KEYS=any).
type Keys interface {
	Usable(ctx context.Context, keyID string) (keys.Record, bool, error)
}

// Emitter takes the usage event of a check.
type Emitter interface {
	Emit(event *contract.Event)
}

// OtherRoute and OtherMethod stand for a route or method no descriptor named (an event needs both).
const (
	OtherRoute  = "other"
	OtherMethod = "OTHER"
)

// Service implements envoy.service.ratelimit.v3.RateLimitService.
type Service struct {
	ratelimitv3.UnimplementedRateLimitServiceServer
	Denylist Denylist
	Keys     Keys
	Events   Emitter
	Mapping  descriptors.Mapping
	Clients  *contract.ClientAddress
	Salt     []byte
	Tenant   string // the tenant of events when keys are not checked
	Source   string // rls:<name>
	Now      func() int64
	Metrics  *stats.Metrics
	Seen     *RequestIDs

	outcomes map[string]prometheus.Counter
	once     sync.Once
}

// ShouldRateLimit answers one check.
func (s *Service) ShouldRateLimit(ctx context.Context, request *ratelimitv3.RateLimitRequest) (*ratelimitv3.RateLimitResponse, error) {
	started := time.Now()
	response, outcome, err := s.check(ctx, request)
	s.once.Do(s.prepare)
	s.outcomes[outcome].Inc()
	s.Metrics.CheckSeconds.Observe(time.Since(started).Seconds())
	return response, err
}

func (s *Service) prepare() {
	s.outcomes = map[string]prometheus.Counter{}
	for _, outcome := range []string{stats.Admitted, stats.Blocked, stats.Unknown, stats.Unavailable, stats.NoKey,
		stats.KeyCheck, stats.BadRequest} {
		s.outcomes[outcome] = s.Metrics.Checks.WithLabelValues(outcome)
	}
}

func (s *Service) check(ctx context.Context, request *ratelimitv3.RateLimitRequest) (*ratelimitv3.RateLimitResponse, string, error) {
	facts, err := s.Mapping.Read(request)
	if err != nil {
		return nil, stats.BadRequest, status.Error(codes.InvalidArgument, err.Error())
	}
	for _, key := range facts.Ignored {
		s.Metrics.IgnoredEntries.WithLabelValues(key).Inc()
	}
	n := len(request.GetDescriptors())
	if !facts.HasAPIKey && s.Keys == nil { // behind another authenticator: passed through, not accounted
		return ok(n), stats.NoKey, nil
	}
	if !facts.HasAPIKey {
		return refused(n, "missing API key: add a request_headers action with descriptor_key api_key"), stats.Unknown, nil
	}
	keyID, err := contract.KeyID(facts.APIKey, s.Salt)
	if err != nil {
		return nil, stats.BadRequest, status.Error(codes.Internal, err.Error())
	}
	tenant, plan := facts.Tenant, ""
	if tenant == "" {
		tenant = s.Tenant
	}
	if s.Keys != nil {
		record, usable, err := s.Keys.Usable(ctx, keyID)
		if errors.Is(err, keys.ErrUnavailable) {
			return nil, stats.KeyCheck, status.Error(codes.Unavailable, "cannot check the API key now; try again")
		} else if err != nil {
			slog.Warn("unreadable key record", "error", err.Error())
			return nil, stats.KeyCheck, status.Error(codes.Unavailable, "cannot check the API key now; try again")
		}
		if !usable {
			return refused(n, "unknown, suspended, revoked or expired API key"), stats.Unknown, nil
		}
		tenant, plan = record.Tenant, record.Plan
	}
	ip := facts.IP
	if s.Clients.Enabled() {
		ip = s.Clients.Of(ip, facts.ForwardedFor, facts.HasForwardedFor, facts.Forwarded, facts.HasForwarded)
	}
	route, method := facts.Route, facts.Method
	if route == "" {
		route = OtherRoute
	}
	if method == "" {
		method = OtherMethod
	}
	now := s.Now()
	event := &contract.Event{EventTimeMS: now, APIKeyID: keyID, Tenant: tenant, Plan: plan, Route: route,
		Method: method, Status: 200, Cost: facts.Cost, ClientIP: ip, Source: s.Source, Stage: "check"}
	var response *ratelimitv3.RateLimitResponse
	outcome := stats.Admitted
	if s.Denylist.Refusing() { // fail-closed, and Redis out of reach for too long
		response = overLimit(request, contract.Block{UntilMS: now + 1000}, now, "rate limiter unavailable; try again")
		outcome = stats.Unavailable
	} else if block, found := s.Denylist.Check(map[string]string{"api_key": keyID, "tenant": tenant, "ip": ip,
		"route": route, "method": method}); found {
		response = overLimit(request, block, now, "rate limit exceeded")
		outcome = stats.Blocked
	} else {
		response = ok(n)
	}
	if outcome != stats.Admitted {
		event.Status, event.EdgeBlocked = 429, true
	}
	s.emit(event, facts.RequestID)
	return response, outcome, nil
}

// emit queues the check's event, once per request id: a second call for the same request (several filters
// or stages, a retried call) is answered but not accounted again.
func (s *Service) emit(event *contract.Event, requestID string) {
	if requestID == "" {
		event.EventID = contract.NewEventID()
	} else {
		if s.Seen.Repeated(event.APIKeyID, requestID) {
			s.Metrics.RepeatedChecks.Inc()
			return
		}
		event.EventID, _ = contract.EventIDFor(requestID, s.Salt)
	}
	s.Events.Emit(event)
}

func ok(descriptors int) *ratelimitv3.RateLimitResponse {
	response := &ratelimitv3.RateLimitResponse{OverallCode: ratelimitv3.RateLimitResponse_OK,
		Statuses: make([]*ratelimitv3.RateLimitResponse_DescriptorStatus, descriptors)}
	for i := range response.Statuses {
		response.Statuses[i] = &ratelimitv3.RateLimitResponse_DescriptorStatus{Code: ratelimitv3.RateLimitResponse_OK}
	}
	return response
}

// refused answers a call whose key may not call: OVER_LIMIT (the RLS API has no 401), with the reason.
func refused(descriptors int, reason string) *ratelimitv3.RateLimitResponse {
	response := ok(descriptors)
	response.OverallCode = ratelimitv3.RateLimitResponse_OVER_LIMIT
	for _, s := range response.Statuses {
		s.Code = ratelimitv3.RateLimitResponse_OVER_LIMIT
	}
	body, _ := json.Marshal(map[string]string{"error": reason})
	response.RawBody = body
	response.ResponseHeadersToAdd = []*corev3.HeaderValue{{Key: "www-authenticate", Value: "ApiKey"},
		{Key: "content-type", Value: "application/json"}}
	return response
}

// overLimit answers a blocked call: every descriptor OVER_LIMIT with the time until the block ends, a
// retry-after header and the body the Python middleware sends with its 429.
func overLimit(request *ratelimitv3.RateLimitRequest, block contract.Block, now int64, message string) *ratelimitv3.RateLimitResponse {
	remainingMS := max(block.UntilMS-now, 0)
	retryAfter := max(int64(math.Ceil(float64(remainingMS)/1000)), 1)
	response := &ratelimitv3.RateLimitResponse{OverallCode: ratelimitv3.RateLimitResponse_OVER_LIMIT}
	for range request.GetDescriptors() {
		response.Statuses = append(response.Statuses, &ratelimitv3.RateLimitResponse_DescriptorStatus{
			Code: ratelimitv3.RateLimitResponse_OVER_LIMIT, DurationUntilReset: durationpb.New(time.Duration(remainingMS) * time.Millisecond),
		})
	}
	body, _ := json.Marshal(map[string]any{"error": message, "policy": block.Policy, "retry_after_s": retryAfter,
		"blocked_until_ms": block.UntilMS})
	response.RawBody = body
	response.ResponseHeadersToAdd = []*corev3.HeaderValue{{Key: "retry-after", Value: strconv.FormatInt(retryAfter, 10)},
		{Key: "content-type", Value: "application/json"}}
	return response
}
