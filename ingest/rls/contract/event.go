package contract

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"golang.org/x/crypto/blake2b"
)

// SchemaVersion is the event contract's version this service writes (the "v" field).
const SchemaVersion = 1

// Event is one usage event (ingest.events.UsageEvent). An event this service writes is a check made before
// the upstream answered: Stage is "check", Status is what the check decided (200 admitted, 429 refused) and
// LatencyMS and ResponseBytes are 0.
type Event struct {
	V             int     `json:"v"`
	EventID       string  `json:"event_id"`
	EventTimeMS   int64   `json:"event_time_ms"`
	APIKeyID      string  `json:"api_key_id"`
	Tenant        string  `json:"tenant"`
	Route         string  `json:"route"`
	Method        string  `json:"method"`
	Status        int     `json:"status"`
	LatencyMS     float64 `json:"latency_ms"`
	ResponseBytes int64   `json:"response_bytes"`
	Cost          int64   `json:"cost"`
	ClientIP      string  `json:"client_ip"`
	EdgeBlocked   bool    `json:"edge_blocked"`
	Plan          string  `json:"plan"`
	Source        string  `json:"source"`
	Stage         string  `json:"stage,omitempty"`
}

// Encode is the event on the wire: JSON, as the Python roles write and read it.
func (e *Event) Encode() ([]byte, error) {
	e.V = SchemaVersion
	return json.Marshal(e)
}

// NewEventID is a random (version 4) UUID.
func NewEventID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand panics instead)
	return formatUUID(b)
}

// EventIDFor is the id of the event of the request Envoy names requestID: the same on every call made for
// that request, so a second call is recognised wherever it lands (a keyed hash in a version 4 layout).
func EventIDFor(requestID string, salt []byte) (string, error) {
	hash, err := blake2b.New(16, salt)
	if err != nil {
		return "", fmt.Errorf("key salt: %w", err)
	}
	hash.Write([]byte("request:" + requestID))
	var b [16]byte
	copy(b[:], hash.Sum(nil))
	return formatUUID(b), nil
}

func formatUUID(b [16]byte) string {
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:], b[10:])
	return string(out[:])
}
