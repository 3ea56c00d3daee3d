package service

import (
	"sync"
	"time"
)

// RequestIDs remembers the request ids checked in the last window, so a request Envoy checks more than
// once (several rate_limits stages or filters, a retried call) is accounted once. Two generations of a
// window each: an id is remembered between one and two windows, in bounded memory.
type RequestIDs struct {
	window  time.Duration
	maxSize int
	mu      sync.Mutex
	current map[string]struct{}
	older   map[string]struct{}
	turned  time.Time
	now     func() time.Time
}

// NewRequestIDs remembers ids for window, at most maxSize per generation.
func NewRequestIDs(window time.Duration, maxSize int, now func() time.Time) *RequestIDs {
	return &RequestIDs{window: window, maxSize: maxSize, current: map[string]struct{}{}, older: map[string]struct{}{},
		turned: now(), now: now}
}

// Repeated says whether id was seen within the window, and remembers it.
func (r *RequestIDs) Repeated(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := r.now(); now.Sub(r.turned) >= r.window || len(r.current) >= r.maxSize {
		r.older, r.current, r.turned = r.current, make(map[string]struct{}, len(r.current)), now
	}
	if _, seen := r.current[id]; seen {
		return true
	}
	_, seen := r.older[id]
	r.current[id] = struct{}{}
	return seen
}
