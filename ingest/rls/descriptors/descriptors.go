// Package descriptors reads what Envoy's rate-limit descriptors say about a request: its API key, tenant,
// client address, route, method, request id and cost, by a mapping from descriptor entry keys to those
// facts (settings.DefaultDescriptors, changed with THROTTLEX_RLS_DESCRIPTORS).
package descriptors

import (
	"fmt"

	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
)

// MaxCost is the largest cost one event may carry (the event contract's bound).
const MaxCost = 1_000_000

// Facts are what one ShouldRateLimit call says about its request.
type Facts struct {
	APIKey, Tenant, IP, Route, Method, RequestID string
	HasAPIKey                                    bool
	ForwardedFor, Forwarded                      string
	HasForwardedFor, HasForwarded                bool
	Cost                                         int64
	// Ignored are entry keys the mapping does not know, for a metric.
	Ignored []string
}

// Mapping maps descriptor entry keys onto facts.
type Mapping map[string]string

// Read gathers the facts of all descriptors of a call (Envoy sends one descriptor per matching rate_limits
// action list). An error says what is wrong with the call: two descriptors naming different values for
// one fact, a cost out of bounds, a refund (is_negative_hits).
func (m Mapping) Read(request *ratelimitv3.RateLimitRequest) (Facts, error) {
	facts := Facts{Cost: 1}
	if request.GetHitsAddend() > 0 {
		facts.Cost = int64(request.GetHitsAddend())
	}
	var descriptorCost int64 = -1
	for _, descriptor := range request.GetDescriptors() {
		if descriptor.GetIsNegativeHits() {
			return Facts{}, fmt.Errorf("is_negative_hits (a refund) is not supported: ThrottleX counts requests, never returns them")
		}
		if addend := descriptor.GetHitsAddend(); addend != nil && int64(addend.GetValue()) > descriptorCost {
			descriptorCost = int64(addend.GetValue())
		}
		for _, entry := range descriptor.GetEntries() {
			if err := m.take(&facts, entry.GetKey(), entry.GetValue()); err != nil {
				return Facts{}, err
			}
		}
	}
	if descriptorCost >= 0 {
		facts.Cost = descriptorCost
	}
	if facts.Cost > MaxCost {
		return Facts{}, fmt.Errorf("hits_addend %d is over the most one request may cost (%d)", facts.Cost, MaxCost)
	}
	return facts, nil
}

func (m Mapping) take(facts *Facts, key, value string) error {
	role, known := m[key]
	if !known {
		facts.Ignored = append(facts.Ignored, key)
		return nil
	}
	var field *string
	switch role {
	case "api_key":
		field, facts.HasAPIKey = &facts.APIKey, true
	case "tenant":
		field = &facts.Tenant
	case "ip":
		field = &facts.IP
	case "route":
		field = &facts.Route
	case "method":
		field = &facts.Method
	case "request_id":
		field = &facts.RequestID
	case "forwarded_for":
		field, facts.HasForwardedFor = &facts.ForwardedFor, true
	case "forwarded":
		field, facts.HasForwarded = &facts.Forwarded, true
	default: // ignore
		return nil
	}
	if *field != "" && *field != value {
		// the values themselves are not quoted: one may be an API key, which never leaves the process
		return fmt.Errorf("descriptor entries %q name two different values for the request's %s", key, role)
	}
	*field = value
	return nil
}
