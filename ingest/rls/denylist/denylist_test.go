package denylist

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/throttlex/throttlex/ingest/rls/contract"
	"github.com/throttlex/throttlex/ingest/rls/stats"
)

func entry(limitKey string, untilMS int64, dims ...string) []byte {
	raw, _ := json.Marshal(contract.Block{LimitKey: limitKey, UntilMS: untilMS, Policy: "p", Dims: dims})
	return raw
}

func TestTheCacheFollowsBlocksAndUnblocksOfEveryKind(t *testing.T) {
	now := int64(1_000_000)
	cache := NewCache(func() int64 { return now }, true, time.Second, stats.New(func() float64 { return 0 }, func() float64 { return 0 }))
	request := map[string]string{"api_key": "k1", "tenant": "acme", "route": "/r"}
	steps := []struct {
		name    string
		message []byte
		want    int64 // until_ms of the block in force for the request; 0: none
	}{
		{"a key's block", entry("api_key=k1", now+5_000, "api_key"), now + 5_000},
		{"a longer block of its tenant on the route", entry("tenant=acme|route=/r", now+9_000, "tenant", "route"), now + 9_000},
		{"the tenant's block lifted", entry("tenant=acme|route=/r", now-1, "tenant", "route"), now + 5_000},
		{"a block of another key", entry("api_key=k2", now+50_000, "api_key"), now + 5_000},
		{"the key's block lifted", entry("api_key=k1", 0, "api_key"), 0},
		{"a malformed message changes nothing", []byte(`{"until_ms": "soon"}`), 0},
		{"an entry written before blocks carried their dimensions", []byte(`{"limit_key":"api_key=k1","until_ms":1002000,"policy":"old"}`), now + 2_000},
	}
	for _, step := range steps {
		cache.Apply(step.message)
		block, found := cache.Check(request)
		if (step.want == 0 && found) || (step.want != 0 && (!found || block.UntilMS != step.want)) {
			t.Fatalf("%s: found %v %+v, want until %d", step.name, found, block, step.want)
		}
	}
	now += 2_000 // the last block ends on time without any message
	if _, found := cache.Check(request); found {
		t.Fatal("an ended block is still enforced")
	}
	if got := len(cache.InForce()); got != 1 {
		t.Fatalf("%d blocks in force, want k2's", got)
	}
}

func TestFailClosedRefusesOnlyOnceRedisHasBeenAwayLongerThanTheBound(t *testing.T) {
	metrics := stats.New(func() float64 { return 0 }, func() float64 { return 0 })
	closed := NewCache(func() int64 { return 0 }, false, time.Hour, metrics)
	if closed.Refusing() {
		t.Fatal("refusing before the bound")
	}
	closed = NewCache(func() int64 { return 0 }, false, time.Second, metrics)
	closed.unsyncedSince.Store(time.Now().Add(-2 * time.Second).UnixNano()) // Redis away for 2 s
	if !closed.Refusing() {
		t.Fatal("not refusing past the bound")
	}
	closed.Synchronised()
	if closed.Refusing() {
		t.Fatal("refusing while synchronised")
	}
	open := NewCache(func() int64 { return 0 }, true, 0, metrics)
	if open.Refusing() {
		t.Fatal("fail-open refuses")
	}
}
