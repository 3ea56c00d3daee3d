package redisconn

import (
	"strings"
	"testing"
	"time"
)

// The URLs the Python roles take, read the same way here (nothing is dialled).
func TestURLs(t *testing.T) {
	tests := []struct {
		url, err string
	}{
		{"redis://127.0.0.1:6379/0", ""},
		{"rediss://user:secret@redis.example:6380/2", ""},
		{"redis+sentinel://s1:26379,s2/primary/0?sentinel_password=x", ""},
		{"rediss+sentinel://s1:26379/primary/1", ""},
		{"redis+cluster://127.0.0.1:7000", "Redis Cluster is not supported"},
		{"memcached://127.0.0.1", "not memcached://"},
		{"redis+sentinel://s1:26379", "names its service"},
		{"redis+sentinel://s1/primary/zero", "not a number"},
		{"rediss://redis:6380/0?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs"},
		{"rediss://redis:6380/0?ssl_cert_reqs=none", "always verifies"},
		{"rediss://redis:6380/0?ssl_certfile=/nonexistent/c.pem&ssl_keyfile=/nonexistent/k.pem", "ssl_certfile"},
	}
	for _, tt := range tests {
		client, err := Connect(tt.url, time.Second)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("%s: %v", tt.url, err)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("%s: error %v, want one saying %q", tt.url, err, tt.err)
		}
		if client != nil {
			_ = client.Close()
		}
	}
}
