// Package keys answers "may this API key call?" from memory, as the Python edge does (ingest.keys): the
// records of the keys seen recently, kept current by the {prefix}:apikeys channel; a key not seen before
// costs one Redis read, and an unknown one is remembered as unknown for a while, so a caller hammering with
// a made-up key costs one read per TTL.
package keys

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/redisconn"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

// Record is a key's record as the registry writes it to Redis (ingest.keys.KeyRecord).
type Record struct {
	KeyID       string `json:"key_id"`
	Tenant      string `json:"tenant"`
	Plan        string `json:"plan"`
	Status      string `json:"status"`
	ExpiresAtMS int64  `json:"expires_at_ms"`
	Version     int64  `json:"version"`
}

// Supersedes says whether r replaces other in a view: a revocation is final; otherwise only later versions.
func (r Record) Supersedes(other Record) bool {
	if other.Status == "revoked" {
		return false
	}
	return r.Status == "revoked" || r.Version >= other.Version
}

// Admits says whether the caller whose key hashes to keyID may call at nowMS.
func (r Record) Admits(keyID string, nowMS int64) bool {
	usable := r.Status == "active" && (r.ExpiresAtMS == 0 || nowMS < r.ExpiresAtMS)
	return subtle.ConstantTimeCompare([]byte(r.KeyID), []byte(keyID)) == 1 && usable
}

func decode(raw []byte) (Record, error) {
	record := Record{Status: "active"}
	if err := json.Unmarshal(raw, &record); err != nil {
		return Record{}, fmt.Errorf("key record: %w", err)
	}
	return record, nil
}

// ErrUnavailable says a key not held in memory could not be looked up: Redis did not answer.
var ErrUnavailable = errors.New("cannot check the API key now")

// Cache holds key records by key id.
type Cache struct {
	client     redis.UniversalClient
	prefix     string
	now        func() int64
	unknownTTL time.Duration
	knownSize  int
	metrics    *stats.Metrics

	mu      sync.RWMutex
	known   map[string]Record
	order   []string // key ids in the order they were added: past knownSize the oldest is forgotten
	unknown map[string]time.Time
}

// NewCache remembers up to knownSize records and 10,000 unknown keys.
func NewCache(client redis.UniversalClient, prefix string, now func() int64, unknownTTL time.Duration,
	knownSize int, metrics *stats.Metrics) *Cache {
	return &Cache{client: client, prefix: prefix, now: now, unknownTTL: unknownTTL, knownSize: knownSize,
		metrics: metrics, known: map[string]Record{}, unknown: map[string]time.Time{}}
}

const unknownSize = 10_000

// Usable is the key's record if it may call now; ok false for an unknown, suspended, revoked or expired
// key; ErrUnavailable if the key is not in memory and Redis does not answer.
func (c *Cache) Usable(ctx context.Context, keyID string) (Record, bool, error) {
	c.mu.RLock()
	record, held := c.known[keyID]
	until, unknown := c.unknown[keyID]
	c.mu.RUnlock()
	switch {
	case held:
		c.metrics.KeyLookups.WithLabelValues("cache").Inc()
	case unknown && time.Now().Before(until):
		c.metrics.KeyLookups.WithLabelValues("unknown_cache").Inc()
		return Record{}, false, nil
	default:
		c.metrics.KeyLookups.WithLabelValues("redis").Inc()
		var err error
		if record, held, err = c.fetch(ctx, keyID); err != nil || !held {
			return Record{}, false, err
		}
	}
	return record, record.Admits(keyID, c.now()), nil
}

func (c *Cache) fetch(ctx context.Context, keyID string) (Record, bool, error) {
	raw, err := c.client.Get(ctx, contract.KeyView(c.prefix, keyID)).Bytes()
	if errors.Is(err, redis.Nil) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if cached, ok := c.known[keyID]; ok { // a change arrived while Redis answered
			return cached, true, nil
		}
		if len(c.unknown) >= unknownSize {
			for id := range c.unknown { // forget one, any
				delete(c.unknown, id)
				break
			}
		}
		c.unknown[keyID] = time.Now().Add(c.unknownTTL)
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	record, err := decode(raw)
	if err != nil {
		return Record{}, false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cached, ok := c.known[keyID]; ok && !record.Supersedes(cached) {
		return cached, true, nil
	}
	c.remember(record)
	return record, true, nil
}

// remember holds record, forgetting the record added longest ago past knownSize. Call with mu held.
func (c *Cache) remember(record Record) {
	if _, ok := c.known[record.KeyID]; !ok {
		if len(c.known) >= c.knownSize {
			oldest := c.order[0]
			c.order = c.order[1:]
			delete(c.known, oldest)
		}
		c.order = append(c.order, record.KeyID)
	}
	c.known[record.KeyID] = record
}

// Apply takes one message of the keys channel: a changed record, or "resync".
func (c *Cache) Apply(ctx context.Context, raw []byte) error {
	if string(raw) == "resync" {
		return c.refresh(ctx)
	}
	record, err := decode(raw)
	if err != nil {
		c.metrics.RedisErrors.WithLabelValues("bad_key_message").Inc()
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.unknown, record.KeyID)
	cached, held := c.known[record.KeyID]
	if held && !record.Supersedes(cached) {
		return nil // an older copy, published late
	}
	if held || record.Status != "active" {
		c.remember(record)
	}
	return nil
}

// refresh forgets unknown keys and rereads the held ones.
func (c *Cache) refresh(ctx context.Context) error {
	c.mu.Lock()
	c.unknown = map[string]time.Time{}
	ids := append([]string(nil), c.order...)
	c.mu.Unlock()
	names := make([]string, len(ids))
	for i, id := range ids {
		names[i] = contract.KeyView(c.prefix, id)
	}
	err := redisconn.MGet(ctx, c.client, names, func(value string) {
		record, err := decode([]byte(value))
		if err != nil {
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if cached, held := c.known[record.KeyID]; !held || record.Supersedes(cached) {
			c.remember(record)
		}
	})
	if err != nil {
		return fmt.Errorf("rereading key records: %w", err)
	}
	return nil
}

// Follow applies the keys channel until ctx ends, rereading the held records after every reconnection.
func (c *Cache) Follow(ctx context.Context, silence, reconnectDelay time.Duration) {
	for ctx.Err() == nil {
		err := c.follow(ctx, silence)
		if ctx.Err() != nil {
			return
		}
		c.metrics.RedisErrors.WithLabelValues("keys").Inc()
		slog.Warn("key cache lost Redis; reconnecting", "error", err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(reconnectDelay):
		}
	}
}

func (c *Cache) follow(ctx context.Context, silence time.Duration) error {
	pubsub := c.client.Subscribe(ctx, contract.KeyChannel(c.prefix))
	defer pubsub.Close()
	if _, err := pubsub.ReceiveTimeout(ctx, silence); err != nil {
		return fmt.Errorf("subscribing to the keys channel: %w", err)
	}
	if err := c.refresh(ctx); err != nil {
		return err
	}
	apply := func(payload string) error { return c.Apply(ctx, []byte(payload)) }
	return redisconn.Listen(ctx, pubsub, silence, apply, func() error { return nil })
}
