// Package denylist keeps the blocks in force in memory, as the Python edge does (ingest.denylist): a
// snapshot of the {prefix}:block-index sorted set and its entries, then every change published on
// {prefix}:blocks, and a fresh snapshot every resync interval and after every reconnection. A check is a
// map lookup under a read lock: no Redis call.
package denylist

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/redisconn"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

type kind struct {
	dims  []string
	count int
}

// Cache holds the blocks in force, by limit key.
type Cache struct {
	now       func() int64 // wall clock, Unix ms
	mu        sync.RWMutex
	blocks    map[string]contract.Block
	kinds     map[string]*kind // blocks held by their dimensions, so a check builds only the keys that can be blocked
	failOpen  bool
	failAfter time.Duration
	// unsyncedSince is when the cache stopped following Redis (Unix ns; 0: following).
	unsyncedSince atomic.Int64
	// heardAt is when the cache was last known complete (Unix ns).
	heardAt atomic.Int64
	metrics *stats.Metrics
}

// NewCache starts unsynchronised: failOpen admits what it does not hold; fail-closed refuses everything
// once failAfter has passed without a snapshot.
func NewCache(now func() int64, failOpen bool, failAfter time.Duration, metrics *stats.Metrics) *Cache {
	c := &Cache{now: now, blocks: map[string]contract.Block{}, kinds: map[string]*kind{}, failOpen: failOpen,
		failAfter: failAfter, metrics: metrics}
	c.unsyncedSince.Store(time.Now().UnixNano())
	return c
}

// Check is the longest block in force for a request whose dimension values are values.
func (c *Cache) Check(values map[string]string) (contract.Block, bool) {
	now := c.now()
	c.mu.RLock()
	defer c.mu.RUnlock()
	var found contract.Block
	ok := false
	for _, k := range c.kinds {
		block, held := c.blocks[contract.LimitKey(k.dims, values)]
		if held && block.UntilMS > now && (!ok || block.UntilMS > found.UntilMS) {
			found, ok = block, true
		}
	}
	return found, ok
}

// Refusing says whether fail-closed applies now: Redis out of reach for longer than failAfter.
func (c *Cache) Refusing() bool {
	since := c.unsyncedSince.Load()
	return !c.failOpen && since != 0 && time.Since(time.Unix(0, since)) >= c.failAfter
}

// Synchronised marks the cache complete (a snapshot was read): the follower calls it after each one.
func (c *Cache) Synchronised() {
	c.heardAt.Store(time.Now().UnixNano())
	c.unsyncedSince.Store(0)
}

// Synced says whether the cache follows Redis now.
func (c *Cache) Synced() bool { return c.unsyncedSince.Load() == 0 }

// AgeSeconds is how long ago the cache was last known complete (for the denylist age metric).
func (c *Cache) AgeSeconds() float64 {
	heard := c.heardAt.Load()
	if heard == 0 {
		return -1
	}
	return time.Since(time.Unix(0, heard)).Seconds()
}

// InForce is every block the cache enforces now (for tests and status).
func (c *Cache) InForce() map[string]contract.Block {
	now := c.now()
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make(map[string]contract.Block, len(c.blocks))
	for key, block := range c.blocks {
		if block.UntilMS > now {
			out[key] = block
		}
	}
	return out
}

func (c *Cache) replace(blocks []contract.Block) {
	fresh, kinds := make(map[string]contract.Block, len(blocks)), map[string]*kind{}
	for _, block := range blocks {
		fresh[block.LimitKey] = block
	}
	for _, block := range fresh {
		addKind(kinds, block.Dims)
	}
	c.mu.Lock()
	c.blocks, c.kinds = fresh, kinds
	c.mu.Unlock()
	c.metrics.DenylistSize.Set(float64(len(fresh)))
}

// Apply takes one message of the blocks channel: a block, or an unblock (a block that has ended).
func (c *Cache) Apply(raw []byte) {
	block, err := contract.DecodeBlock(raw)
	if err != nil {
		c.metrics.RedisErrors.WithLabelValues("bad_message").Inc()
		slog.Warn("ignoring a malformed denylist message", "error", err.Error())
		return
	}
	now := c.now()
	c.mu.Lock()
	old, held := c.blocks[block.LimitKey]
	if held {
		dropKind(c.kinds, old.Dims)
		delete(c.blocks, block.LimitKey)
	}
	if block.UntilMS > now {
		c.blocks[block.LimitKey] = block
		addKind(c.kinds, block.Dims)
	}
	size := len(c.blocks)
	c.mu.Unlock()
	c.metrics.DenylistSize.Set(float64(size))
}

func addKind(kinds map[string]*kind, dims []string) {
	name := strings.Join(dims, "|")
	if k, ok := kinds[name]; ok {
		k.count++
		return
	}
	kinds[name] = &kind{dims: dims, count: 1}
}

func dropKind(kinds map[string]*kind, dims []string) {
	name := strings.Join(dims, "|")
	if k, ok := kinds[name]; ok {
		if k.count--; k.count == 0 {
			delete(kinds, name)
		}
	}
}

// Follower keeps a Cache in step with Redis.
type Follower struct {
	Cache          *Cache
	Client         redis.UniversalClient
	Prefix         string
	Silence        time.Duration // a subscription silent this long is pinged; silent as long again, it is dropped
	ResyncInterval time.Duration
	ReconnectDelay time.Duration
	// Synced is closed after the first snapshot.
	Synced   chan struct{}
	syncOnce sync.Once
}

// Run follows Redis until ctx ends, reconnecting after every failure.
func (f *Follower) Run(ctx context.Context) {
	for ctx.Err() == nil {
		err := f.follow(ctx)
		if ctx.Err() != nil {
			return
		}
		f.Cache.unsyncedSince.CompareAndSwap(0, time.Now().UnixNano())
		f.Cache.metrics.RedisErrors.WithLabelValues(errorKind(err)).Inc()
		slog.Warn("denylist lost Redis; reconnecting", "error", err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(f.ReconnectDelay):
		}
	}
}

func (f *Follower) follow(ctx context.Context) error {
	pubsub := f.Client.Subscribe(ctx, contract.BlockChannel(f.Prefix))
	defer pubsub.Close()
	if _, err := pubsub.ReceiveTimeout(ctx, f.Silence); err != nil { // confirmed before the snapshot is read
		return fmt.Errorf("subscribing to the blocks channel: %w", err)
	}
	if err := f.snapshot(ctx); err != nil {
		return err
	}
	nextResync := time.Now().Add(f.ResyncInterval)
	apply := func(payload string) error {
		f.Cache.heardAt.Store(time.Now().UnixNano())
		f.Cache.Apply([]byte(payload))
		return nil
	}
	return redisconn.Listen(ctx, pubsub, f.Silence, apply, func() error {
		if time.Now().Before(nextResync) {
			return nil
		}
		nextResync = time.Now().Add(f.ResyncInterval)
		return f.snapshot(ctx)
	})
}

// snapshot replaces the cache with the blocks in force in Redis: the index, then their entries. Messages
// that arrive meanwhile wait on the subscription and are applied after it.
func (f *Follower) snapshot(ctx context.Context) error {
	limitKeys, err := f.Client.ZRangeByScore(ctx, contract.BlockIndex(f.Prefix), &redis.ZRangeBy{
		Min: "(" + strconv.FormatInt(f.Cache.now(), 10), Max: "+inf",
	}).Result()
	if err != nil {
		return fmt.Errorf("reading the block index: %w", err)
	}
	names := make([]string, len(limitKeys))
	for i, key := range limitKeys {
		names[i] = contract.BlockKey(f.Prefix, key)
	}
	blocks := make([]contract.Block, 0, len(limitKeys))
	err = redisconn.MGet(ctx, f.Client, names, func(value string) { // a key ended or lifted since the index was read is skipped
		block, err := contract.DecodeBlock([]byte(value))
		if err != nil {
			f.Cache.metrics.RedisErrors.WithLabelValues("bad_entry").Inc()
			return
		}
		blocks = append(blocks, block)
	})
	if err != nil {
		return fmt.Errorf("reading the blocks in force: %w", err)
	}
	f.Cache.replace(blocks)
	f.Cache.Synchronised()
	f.syncOnce.Do(func() { close(f.Synced) })
	return nil
}

func errorKind(err error) string {
	var netErr net.Error
	switch {
	case errors.As(err, &netErr):
		return "network"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	default:
		return "redis"
	}
}
