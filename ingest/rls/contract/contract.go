// Package contract holds what the Envoy rate-limit service shares with ThrottleX's Python roles: API key
// ids, limit keys, the denylist entries in Redis, the usage event, the trusted-proxy rule for the client
// address. Each is checked against tests/conformance/vectors.json, which the Python suite reads too.
package contract

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"

	"golang.org/x/crypto/blake2b"
)

// KeyID is the id an API key is counted, blocked and stored under: a BLAKE2b digest of 12 bytes keyed
// with the deployment's salt, in hex (ingest.events.key_id_for).
func KeyID(apiKey string, salt []byte) (string, error) {
	hash, err := blake2b.New(12, salt)
	if err != nil {
		return "", fmt.Errorf("key salt: %w", err)
	}
	hash.Write([]byte(apiKey))
	return hex.EncodeToString(hash.Sum(nil)), nil
}

// Dimensions are what a policy can count by, in the order their pairs appear in a limit key.
var Dimensions = []string{"api_key", "tenant", "ip", "route", "method"}

// LimitKey names what a policy keyed on dims counts for a request with these values: "dim=value" pairs
// joined by "|" in the order of dims (ingest.denylist_entries.request_limit_key).
func LimitKey(dims []string, values map[string]string) string {
	if len(dims) == 1 {
		return dims[0] + "=" + values[dims[0]]
	}
	var b strings.Builder
	for i, dim := range dims {
		if i > 0 {
			b.WriteByte('|')
		}
		b.WriteString(dim)
		b.WriteByte('=')
		b.WriteString(values[dim])
	}
	return b.String()
}

// Block is one denylist entry as workers write it to Redis ({prefix}:block:{limit_key}) and publish it on
// {prefix}:blocks. A block whose UntilMS has passed is an unblock.
type Block struct {
	LimitKey    string   `json:"limit_key"`
	UntilMS     int64    `json:"until_ms"`
	Policy      string   `json:"policy"`
	PublishedMS int64    `json:"published_ms"`
	Dims        []string `json:"dims"`
}

// DecodeBlock reads one entry; an entry without dims is keyed on the API key, as the first ones were.
func DecodeBlock(raw []byte) (Block, error) {
	var block Block
	if err := json.Unmarshal(raw, &block); err != nil {
		return Block{}, fmt.Errorf("denylist entry: %w", err)
	}
	if block.LimitKey == "" {
		return Block{}, fmt.Errorf("denylist entry without a limit_key: %.80s", raw)
	}
	if block.Dims == nil {
		block.Dims = []string{"api_key"}
	}
	return block, nil
}

// BlockKey is the Redis key holding the entry of limitKey.
func BlockKey(prefix, limitKey string) string { return prefix + ":block:" + limitKey }

// BlockIndex is the sorted set of the limit keys blocked, scored by their until_ms.
func BlockIndex(prefix string) string { return prefix + ":block-index" }

// BlockChannel carries every new or changed entry.
func BlockChannel(prefix string) string { return prefix + ":blocks" }

// KeyView is the Redis key holding an API key's record; KeyChannel carries each changed record, or
// "resync" after the registry rewrote the whole view.
func KeyView(prefix, keyID string) string { return prefix + ":apikey:" + keyID }

// KeyChannel carries each changed key record (see KeyView).
func KeyChannel(prefix string) string { return prefix + ":apikeys" }
