package descriptors

import (
	"strings"
	"testing"

	commonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/throttlex/throttlex/ingest/rls/settings"
)

func descriptor(pairs ...string) *commonv3.RateLimitDescriptor {
	d := &commonv3.RateLimitDescriptor{}
	for i := 0; i < len(pairs); i += 2 {
		d.Entries = append(d.Entries, &commonv3.RateLimitDescriptor_Entry{Key: pairs[i], Value: pairs[i+1]})
	}
	return d
}

func TestRead(t *testing.T) {
	mapping := Mapping(settings.DefaultDescriptors)
	withCost := descriptor("api_key", "k1")
	withCost.HitsAddend = wrapperspb.UInt64(7)
	zeroCost := descriptor("api_key", "k1")
	zeroCost.HitsAddend = wrapperspb.UInt64(0)
	tests := []struct {
		name    string
		request *ratelimitv3.RateLimitRequest
		want    Facts
		err     string
	}{
		{name: "the common actions, one descriptor each",
			request: &ratelimitv3.RateLimitRequest{Domain: "edge", Descriptors: []*commonv3.RateLimitDescriptor{
				descriptor("remote_address", "203.0.113.7"), descriptor("api_key", "k1", "generic_key", "/v1/search"),
				descriptor("method", "GET", "request_id", "r-1")}},
			want: Facts{APIKey: "k1", HasAPIKey: true, IP: "203.0.113.7", Route: "/v1/search", Method: "GET", RequestID: "r-1", Cost: 1}},
		{name: "the request's hits_addend is the cost",
			request: &ratelimitv3.RateLimitRequest{HitsAddend: 5, Descriptors: []*commonv3.RateLimitDescriptor{descriptor("api_key", "k1")}},
			want:    Facts{APIKey: "k1", HasAPIKey: true, Cost: 5}},
		{name: "a descriptor's hits_addend overrides the request's",
			request: &ratelimitv3.RateLimitRequest{HitsAddend: 5, Descriptors: []*commonv3.RateLimitDescriptor{withCost}},
			want:    Facts{APIKey: "k1", HasAPIKey: true, Cost: 7}},
		{name: "a descriptor's hits_addend of 0 costs nothing",
			request: &ratelimitv3.RateLimitRequest{Descriptors: []*commonv3.RateLimitDescriptor{zeroCost}},
			want:    Facts{APIKey: "k1", HasAPIKey: true, Cost: 0}},
		{name: "unknown entries are listed, not dropped silently",
			request: &ratelimitv3.RateLimitRequest{Descriptors: []*commonv3.RateLimitDescriptor{descriptor("header_match", "premium", "api_key", "k1")}},
			want:    Facts{APIKey: "k1", HasAPIKey: true, Cost: 1, Ignored: []string{"header_match"}}},
		{name: "the same value twice is one fact",
			request: &ratelimitv3.RateLimitRequest{Descriptors: []*commonv3.RateLimitDescriptor{descriptor("api_key", "k1"), descriptor("api_key", "k1", "tenant", "acme")}},
			want:    Facts{APIKey: "k1", HasAPIKey: true, Tenant: "acme", Cost: 1}},
		{name: "two API keys in one call are refused",
			request: &ratelimitv3.RateLimitRequest{Descriptors: []*commonv3.RateLimitDescriptor{descriptor("api_key", "k1"), descriptor("api_key", "k2")}},
			err:     "two different values for the request's api_key"},
		{name: "a refund is refused",
			request: &ratelimitv3.RateLimitRequest{Descriptors: []*commonv3.RateLimitDescriptor{{IsNegativeHits: true}}},
			err:     "is_negative_hits"},
		{name: "a cost past the contract's bound is refused",
			request: &ratelimitv3.RateLimitRequest{HitsAddend: MaxCost + 1, Descriptors: []*commonv3.RateLimitDescriptor{descriptor("api_key", "k1")}},
			err:     "over the most one request may cost"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mapping.Read(tt.request)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one saying %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.APIKey != tt.want.APIKey || got.HasAPIKey != tt.want.HasAPIKey || got.Tenant != tt.want.Tenant ||
				got.IP != tt.want.IP || got.Route != tt.want.Route || got.Method != tt.want.Method ||
				got.RequestID != tt.want.RequestID || got.Cost != tt.want.Cost || strings.Join(got.Ignored, ",") != strings.Join(tt.want.Ignored, ",") {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
