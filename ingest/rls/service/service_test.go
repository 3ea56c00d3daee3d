package service

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	commonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/denylist"
	"github.com/throttlex/throttlex/ingest/rls/descriptors"
	"github.com/throttlex/throttlex/ingest/rls/keys"
	"github.com/throttlex/throttlex/ingest/rls/settings"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

const now = int64(1_765_000_000_000)

var salt = []byte("service-test-salt")

// registered is a key directory held in memory: the key cache's answers without Redis behind it.
type registered struct {
	records     map[string]keys.Record
	unavailable bool
}

func (r registered) Usable(_ context.Context, keyID string) (keys.Record, bool, error) {
	if r.unavailable {
		return keys.Record{}, false, fmt.Errorf("%w: connection refused", keys.ErrUnavailable)
	}
	record, ok := r.records[keyID]
	return record, ok && record.Admits(keyID, now), nil
}

type collected struct{ events []contract.Event }

func (c *collected) Emit(event *contract.Event) { c.events = append(c.events, *event) }

func keyID(t *testing.T, key string) string {
	id, err := contract.KeyID(key, salt)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func newService(t *testing.T, failOpen bool) (*Service, *denylist.Cache, *collected) {
	metrics := stats.New(func() float64 { return 0 }, func() float64 { return 0 })
	cache := denylist.NewCache(func() int64 { return now }, failOpen, 0, metrics)
	if failOpen {
		cache.Synchronised()
	}
	clients, _ := contract.NewClientAddress([]string{"10.0.0.0/8"})
	out := &collected{}
	active := keys.Record{KeyID: keyID(t, "good-key"), Tenant: "acme", Plan: "pro", Status: "active"}
	revoked := keys.Record{KeyID: keyID(t, "revoked-key"), Tenant: "acme", Status: "revoked"}
	svc := &Service{Denylist: cache, Events: out, Mapping: descriptors.Mapping(settings.DefaultDescriptors),
		Keys:    registered{records: map[string]keys.Record{active.KeyID: active, revoked.KeyID: revoked}},
		Clients: clients, Salt: salt, Tenant: "default", Source: "rls:test", Now: func() int64 { return now },
		Metrics: metrics, Seen: NewRequestIDs(time.Minute, 1000, time.Now)}
	return svc, cache, out
}

func call(pairs ...string) *ratelimitv3.RateLimitRequest {
	d := &commonv3.RateLimitDescriptor{}
	for i := 0; i < len(pairs); i += 2 {
		d.Entries = append(d.Entries, &commonv3.RateLimitDescriptor_Entry{Key: pairs[i], Value: pairs[i+1]})
	}
	return &ratelimitv3.RateLimitRequest{Domain: "edge", Descriptors: []*commonv3.RateLimitDescriptor{d}}
}

func block(t *testing.T, cache *denylist.Cache, limitKey string, dims []string, untilMS int64) {
	raw, _ := json.Marshal(contract.Block{LimitKey: limitKey, UntilMS: untilMS, Policy: "per-key", Dims: dims})
	cache.Apply(raw)
}

func header(response *ratelimitv3.RateLimitResponse, name string) string {
	for _, h := range response.GetResponseHeadersToAdd() {
		if h.GetKey() == name {
			return h.GetValue()
		}
	}
	return ""
}

func TestAnAdmittedCheckIsOneEventOfTheKeysTenantAndPlan(t *testing.T) {
	svc, _, out := newService(t, true)
	response, err := svc.ShouldRateLimit(context.Background(),
		call("api_key", "good-key", "route", "/v1/search", "method", "GET", "remote_address", "203.0.113.7"))
	if err != nil || response.GetOverallCode() != ratelimitv3.RateLimitResponse_OK {
		t.Fatalf("response %v, error %v", response, err)
	}
	want := contract.Event{EventTimeMS: now, APIKeyID: keyID(t, "good-key"), Tenant: "acme", Plan: "pro", Route: "/v1/search",
		Method: "GET", Status: 200, Cost: 1, ClientIP: "203.0.113.7", Source: "rls:test", Stage: "check"}
	if len(out.events) != 1 {
		t.Fatalf("%d events", len(out.events))
	}
	got := out.events[0]
	got.EventID = ""
	if got != want {
		t.Fatalf("event %+v, want %+v", got, want)
	}
}

func TestABlockedKeyIsOverLimitUntilItsBlockEnds(t *testing.T) {
	tests := []struct {
		name     string
		limitKey string
		dims     []string
		untilMS  int64
		blocked  bool
	}{
		{"the key's block", "api_key=" + keyID(t, "good-key"), []string{"api_key"}, now + 2_500, true},
		{"its tenant's block on the route", "tenant=acme|route=/v1/search", []string{"tenant", "route"}, now + 60_000, true},
		{"its address's block", "ip=203.0.113.7", []string{"ip"}, now + 1_000, true},
		{"another key's block", "api_key=" + keyID(t, "other-key"), []string{"api_key"}, now + 60_000, false},
		{"a block that has ended", "api_key=" + keyID(t, "good-key"), []string{"api_key"}, now, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc, cache, out := newService(t, true)
			block(t, cache, tt.limitKey, tt.dims, tt.untilMS)
			response, err := svc.ShouldRateLimit(context.Background(),
				call("api_key", "good-key", "route", "/v1/search", "method", "GET", "remote_address", "203.0.113.7"))
			if err != nil {
				t.Fatal(err)
			}
			if !tt.blocked {
				if response.GetOverallCode() != ratelimitv3.RateLimitResponse_OK || out.events[0].EdgeBlocked {
					t.Fatalf("refused: %v", response)
				}
				return
			}
			status := response.GetStatuses()[0]
			wantReset := time.Duration(tt.untilMS-now) * time.Millisecond
			if response.GetOverallCode() != ratelimitv3.RateLimitResponse_OVER_LIMIT ||
				status.GetDurationUntilReset().AsDuration() != wantReset {
				t.Fatalf("response %v, want OVER_LIMIT for %s", response, wantReset)
			}
			if want := fmt.Sprint(int64((wantReset + time.Second - 1) / time.Second)); header(response, "retry-after") != want {
				t.Fatalf("retry-after %q, want %s", header(response, "retry-after"), want)
			}
			if e := out.events[0]; !e.EdgeBlocked || e.Status != 429 {
				t.Fatalf("event %+v: a refused check is accounted as edge-blocked", e)
			}
		})
	}
}

func TestKeysThatMayNotCallAreRefusedAndNotAccounted(t *testing.T) {
	for _, key := range []string{"revoked-key", "unknown-key"} {
		svc, _, out := newService(t, true)
		response, err := svc.ShouldRateLimit(context.Background(), call("api_key", key))
		if err != nil || response.GetOverallCode() != ratelimitv3.RateLimitResponse_OVER_LIMIT ||
			header(response, "www-authenticate") != "ApiKey" || len(out.events) != 0 {
			t.Fatalf("%s: response %v, error %v, %d events", key, response, err, len(out.events))
		}
	}
	svc, _, out := newService(t, true)
	if response, _ := svc.ShouldRateLimit(context.Background(), call("method", "GET")); response.GetOverallCode() !=
		ratelimitv3.RateLimitResponse_OVER_LIMIT || len(out.events) != 0 {
		t.Fatalf("a call without a key: %v", response)
	}
}

func TestAKeyThatCannotBeCheckedIsAnErrorForEnvoysFailureMode(t *testing.T) {
	svc, _, out := newService(t, true)
	svc.Keys = registered{unavailable: true}
	_, err := svc.ShouldRateLimit(context.Background(), call("api_key", "good-key"))
	if status.Code(err) != codes.Unavailable || len(out.events) != 0 {
		t.Fatalf("error %v, %d events", err, len(out.events))
	}
}

func TestWithoutAKeyCheckEveryKeyPassesUnderTheConfiguredTenant(t *testing.T) {
	svc, _, out := newService(t, true)
	svc.Keys = nil
	response, _ := svc.ShouldRateLimit(context.Background(), call("api_key", "anything"))
	if response.GetOverallCode() != ratelimitv3.RateLimitResponse_OK || out.events[0].Tenant != "default" {
		t.Fatalf("response %v, events %+v", response, out.events)
	}
	response, _ = svc.ShouldRateLimit(context.Background(), call("method", "GET"))
	if response.GetOverallCode() != ratelimitv3.RateLimitResponse_OK || len(out.events) != 1 {
		t.Fatalf("a call without a key: %v, %d events", response, len(out.events))
	}
}

func TestARequestCheckedTwiceIsAccountedOnce(t *testing.T) {
	svc, _, out := newService(t, true)
	for range 3 {
		svc.ShouldRateLimit(context.Background(), call("api_key", "good-key", "request_id", "req-7"))
	}
	svc.ShouldRateLimit(context.Background(), call("api_key", "good-key", "request_id", "req-8"))
	svc.Keys = nil                                                                                   // any key passes
	svc.ShouldRateLimit(context.Background(), call("api_key", "another-key", "request_id", "req-7")) // another key's request
	if len(out.events) != 3 {
		t.Fatalf("%d events for three requests", len(out.events))
	}
	if id, _ := contract.EventIDFor("req-7", salt); out.events[0].EventID != id {
		t.Fatalf("event id %s, want the request's %s", out.events[0].EventID, id)
	}
}

func TestFailClosedRefusesOnceTheDenylistIsOutOfStep(t *testing.T) {
	svc, _, out := newService(t, false) // never synchronised, fail-after 0
	response, _ := svc.ShouldRateLimit(context.Background(), call("api_key", "good-key"))
	if response.GetOverallCode() != ratelimitv3.RateLimitResponse_OVER_LIMIT || !out.events[0].EdgeBlocked {
		t.Fatalf("response %v", response)
	}
}

func TestTheClientBehindTrustedProxiesIsCounted(t *testing.T) {
	svc, _, out := newService(t, true)
	svc.ShouldRateLimit(context.Background(), call("api_key", "good-key", "remote_address", "10.1.1.1",
		"x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.2.2.2"))
	if got := out.events[0].ClientIP; got != "203.0.113.7" {
		t.Fatalf("client %s", got)
	}
}

func TestABadCallIsInvalidArgument(t *testing.T) {
	svc, _, _ := newService(t, true)
	request := call("api_key", "good-key")
	request.Descriptors = append(request.Descriptors, call("api_key", "other-key").Descriptors...)
	if _, err := svc.ShouldRateLimit(context.Background(), request); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("error %v", err)
	}
}
