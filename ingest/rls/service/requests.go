package service

import (
	"crypto/sha256"
	"sync"
	"time"
)

// requestKey is what is remembered of one request: a digest of its API key id and its request id (16 bytes,
// whatever the length of the id the caller sent).
type requestKey [16]byte

// RequestIDs remembers the requests checked in the last window, so a request Envoy checks more than once
// (several rate_limits stages or filters, a retried call) is accounted once. A request is its API key and
// its id together: an id a client reuses across keys, or one that another key sent, does not spare a
// request from being counted. Two generations of a window each: a request is remembered between one and
// two windows, at most maxSize per generation (a generation that fills turns early).
type RequestIDs struct {
	window  time.Duration
	maxSize int
	mu      sync.Mutex
	current map[requestKey]struct{}
	older   map[requestKey]struct{}
	turned  time.Time
	now     func() time.Time
}

// NewRequestIDs remembers ids for window, at most maxSize per generation.
func NewRequestIDs(window time.Duration, maxSize int, now func() time.Time) *RequestIDs {
	return &RequestIDs{window: window, maxSize: maxSize, current: map[requestKey]struct{}{},
		older: map[requestKey]struct{}{}, turned: now(), now: now}
}

// Repeated says whether the request id of the key keyID was seen within the window, and remembers it.
func (r *RequestIDs) Repeated(keyID, requestID string) bool {
	digest := sha256.Sum256([]byte(keyID + "\x00" + requestID))
	var id requestKey
	copy(id[:], digest[:])
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := r.now(); now.Sub(r.turned) >= r.window || len(r.current) >= r.maxSize {
		r.older, r.current, r.turned = r.current, make(map[requestKey]struct{}, len(r.current)), now
	}
	if _, seen := r.current[id]; seen {
		return true
	}
	_, seen := r.older[id]
	r.current[id] = struct{}{}
	return seen
}
