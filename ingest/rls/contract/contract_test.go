package contract

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// vectors is tests/conformance/vectors.json, written by the Python implementation (tests/conformance/generate.py).
type vectors struct {
	Salt   string `json:"salt"`
	KeyIDs []struct {
		APIKey string `json:"api_key"`
		KeyID  string `json:"key_id"`
	} `json:"key_ids"`
	LimitKeys []struct {
		Dims     []string          `json:"dims"`
		Values   map[string]string `json:"values"`
		LimitKey string            `json:"limit_key"`
	} `json:"limit_keys"`
	Blocks     []json.RawMessage `json:"blocks"`
	Events     []json.RawMessage `json:"events"`
	Partitions []struct {
		Key        string `json:"key"`
		Partitions int    `json:"partitions"`
		Partition  int    `json:"partition"`
	} `json:"partitions"`
	ClientAddresses []struct {
		TrustedProxies []string `json:"trusted_proxies"`
		Peer           string   `json:"peer"`
		XForwardedFor  *string  `json:"x_forwarded_for"`
		Forwarded      *string  `json:"forwarded"`
		Client         string   `json:"client"`
	} `json:"client_addresses"`
}

func load(t *testing.T) vectors {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "tests", "conformance", "vectors.json"))
	if err != nil {
		t.Fatalf("reading the conformance vectors: %v", err)
	}
	var v vectors
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("decoding the conformance vectors: %v", err)
	}
	return v
}

func TestKeyIDsMatchThePythonGateway(t *testing.T) {
	v := load(t)
	for _, c := range v.KeyIDs {
		got, err := KeyID(c.APIKey, []byte(v.Salt))
		if err != nil {
			t.Fatal(err)
		}
		if got != c.KeyID {
			t.Errorf("KeyID(%q) = %s, the Python gateway says %s", c.APIKey, got, c.KeyID)
		}
	}
}

func TestLimitKeysMatchTheWorkers(t *testing.T) {
	for _, c := range load(t).LimitKeys {
		if got := LimitKey(c.Dims, c.Values); got != c.LimitKey {
			t.Errorf("LimitKey(%v, %v) = %q, want %q", c.Dims, c.Values, got, c.LimitKey)
		}
	}
}

func TestBlocksWrittenByWorkersDecode(t *testing.T) {
	for _, raw := range load(t).Blocks {
		block, err := DecodeBlock(raw)
		if err != nil {
			t.Fatal(err)
		}
		var fields map[string]any
		_ = json.Unmarshal(raw, &fields)
		again, _ := json.Marshal(block)
		var back map[string]any
		_ = json.Unmarshal(again, &back)
		if !reflect.DeepEqual(fields, back) {
			t.Errorf("block %s read as %s", raw, again)
		}
	}
}

func TestEventsEncodeAsThePythonContractDoes(t *testing.T) {
	for _, raw := range load(t).Events {
		var event Event
		if err := json.Unmarshal(raw, &event); err != nil {
			t.Fatal(err)
		}
		encoded, err := event.Encode()
		if err != nil {
			t.Fatal(err)
		}
		var want, got map[string]any
		_ = json.Unmarshal(raw, &want)
		_ = json.Unmarshal(encoded, &got)
		if !reflect.DeepEqual(want, got) {
			t.Errorf("encoded %s, the Python contract writes %s", encoded, raw)
		}
	}
}

// The producer's partitioner (franz-go's, as the service configures it) puts each key where librdkafka's
// murmur2_random and the Java client do.
func TestPartitionsMatchKafkasMurmur2(t *testing.T) {
	partitioner := kgo.StickyKeyPartitioner(nil).ForTopic("events")
	for _, c := range load(t).Partitions {
		got := partitioner.Partition(&kgo.Record{Key: []byte(c.Key)}, c.Partitions)
		if got != c.Partition {
			t.Errorf("key %q over %d partitions: %d, want %d", c.Key, c.Partitions, got, c.Partition)
		}
	}
}

func TestClientAddressesFollowTheTrustedProxyRule(t *testing.T) {
	for _, c := range load(t).ClientAddresses {
		rule, err := NewClientAddress(c.TrustedProxies)
		if err != nil {
			t.Fatal(err)
		}
		xff, forwarded := "", ""
		if c.XForwardedFor != nil {
			xff = *c.XForwardedFor
		}
		if c.Forwarded != nil {
			forwarded = *c.Forwarded
		}
		got := rule.Of(c.Peer, xff, c.XForwardedFor != nil, forwarded, c.Forwarded != nil)
		if got != c.Client {
			t.Errorf("trusted %v, peer %s, XFF %v, Forwarded %v: client %s, want %s",
				c.TrustedProxies, c.Peer, c.XForwardedFor, c.Forwarded, got, c.Client)
		}
	}
}

func TestEventIDForARequestIsStableAndAVersion4UUID(t *testing.T) {
	first, _ := EventIDFor("req-1", []byte("salt"))
	again, _ := EventIDFor("req-1", []byte("salt"))
	other, _ := EventIDFor("req-2", []byte("salt"))
	if first != again || first == other {
		t.Fatalf("ids %s %s %s", first, again, other)
	}
	if len(first) != 36 || first[14] != '4' || !reflect.DeepEqual(true, first[19] == '8' || first[19] == '9' || first[19] == 'a' || first[19] == 'b') {
		t.Fatalf("%s is not a version 4 UUID", first)
	}
}
