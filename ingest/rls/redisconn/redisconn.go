// Package redisconn makes a Redis client from a THROTTLEX_REDIS_URL, as the Python roles read it
// (ingest.redis_connection): redis:// or rediss:// for one server, redis+sentinel:// or rediss+sentinel://
// for the primary a set of Sentinels names. Redis Cluster is refused, for the same reason.
package redisconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrCluster says why a Redis Cluster is refused.
var ErrCluster = errors.New("Redis Cluster is not supported: ThrottleX needs one primary (its denylist is small and " +
	"its edges follow one channel); give it a single Redis, or a primary found through Sentinel (docs/clusters.md)")

const defaultSentinelPort = "26379"

// Connect makes a client for url whose every call waits at most timeout. Nothing is dialled yet.
func Connect(rawURL string, timeout time.Duration) (redis.UniversalClient, error) {
	scheme, _, _ := strings.Cut(rawURL, "://")
	scheme = strings.ToLower(scheme)
	switch {
	case strings.HasSuffix(scheme, "+cluster"):
		return nil, ErrCluster
	case scheme == "redis+sentinel" || scheme == "rediss+sentinel":
		return sentinel(rawURL, scheme == "rediss+sentinel", timeout)
	case scheme == "redis" || scheme == "rediss" || scheme == "unix":
		files, stripped, err := takeTLSFiles(rawURL)
		if err != nil {
			return nil, err
		}
		options, err := redis.ParseURL(stripped)
		if err != nil {
			return nil, fmt.Errorf("THROTTLEX_REDIS_URL: %w", err)
		}
		if options.TLSConfig != nil {
			if err := files.apply(options.TLSConfig); err != nil {
				return nil, err
			}
		}
		bound(options, timeout)
		return redis.NewClient(options), nil
	default:
		return nil, fmt.Errorf("a Redis URL starts with redis://, rediss://, unix:// or redis+sentinel://, not %s://", scheme)
	}
}

func bound(options *redis.Options, timeout time.Duration) {
	options.DialTimeout, options.ReadTimeout, options.WriteTimeout = timeout, timeout, timeout
	options.MaxRetries = -1 // the followers reconnect and resynchronise themselves; nothing waits behind a backoff
}

// tlsFiles are the TLS options of a URL's query, by the Python client's names: the CA that signed the
// server's certificate, and a client certificate and its key.
type tlsFiles struct{ ca, cert, key string }

func (f tlsFiles) apply(config *tls.Config) error {
	if f.ca != "" {
		certs, err := pool(f.ca)
		if err != nil {
			return err
		}
		config.RootCAs = certs
	}
	if f.cert != "" || f.key != "" {
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return fmt.Errorf("ssl_certfile and ssl_keyfile in THROTTLEX_REDIS_URL: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return nil
}

// takeTLSFiles removes the Python client's TLS options from the query, which go-redis does not know. An
// ssl_cert_reqs other than required is refused: this service always verifies the server.
func takeTLSFiles(rawURL string) (tlsFiles, string, error) {
	parsed, err := url.Parse(rawURL)
	if err != nil {
		return tlsFiles{}, "", fmt.Errorf("THROTTLEX_REDIS_URL: %w", err)
	}
	query := parsed.Query()
	files := tlsFiles{query.Get("ssl_ca_certs"), query.Get("ssl_certfile"), query.Get("ssl_keyfile")}
	if reqs := query.Get("ssl_cert_reqs"); reqs != "" && reqs != "required" {
		return tlsFiles{}, "", fmt.Errorf("THROTTLEX_REDIS_URL: ssl_cert_reqs=%s: throttlex-rls always verifies the server's certificate", reqs)
	}
	for _, name := range []string{"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"} {
		query.Del(name)
	}
	parsed.RawQuery = query.Encode()
	return files, parsed.String(), nil
}

func pool(caFile string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("ssl_ca_certs in THROTTLEX_REDIS_URL: %w", err)
	}
	certs := x509.NewCertPool()
	if !certs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("ssl_ca_certs in THROTTLEX_REDIS_URL: no PEM certificate in %s", caFile)
	}
	return certs, nil
}

// sentinel reads redis+sentinel://[user:password@]host:port,host:port/service/db[?sentinel_password=…].
func sentinel(rawURL string, useTLS bool, timeout time.Duration) (redis.UniversalClient, error) {
	rest := rawURL[strings.Index(rawURL, "://")+3:]
	var user, password string
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		credentials := rest[:at]
		rest = rest[at+1:]
		user, password, _ = strings.Cut(credentials, ":")
		user, _ = url.PathUnescape(user)
		password, _ = url.PathUnescape(password)
	}
	rest, rawQuery, _ := strings.Cut(rest, "?")
	hosts, path, _ := strings.Cut(rest, "/")
	service, dbText, _ := strings.Cut(path, "/")
	if service == "" {
		return nil, fmt.Errorf("THROTTLEX_REDIS_URL: a Sentinel URL names its service: redis+sentinel://host:26379/service/0")
	}
	options := &redis.FailoverOptions{MasterName: service, Username: user, Password: password}
	for _, host := range strings.Split(hosts, ",") {
		if _, _, err := net.SplitHostPort(host); err != nil {
			host = net.JoinHostPort(host, defaultSentinelPort)
		}
		options.SentinelAddrs = append(options.SentinelAddrs, host)
	}
	if dbText != "" {
		db, err := strconv.Atoi(dbText)
		if err != nil {
			return nil, fmt.Errorf("THROTTLEX_REDIS_URL: database %q is not a number", dbText)
		}
		options.DB = db
	}
	query, _ := url.ParseQuery(rawQuery)
	options.SentinelPassword = query.Get("sentinel_password")
	if useTLS {
		options.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		files := tlsFiles{query.Get("ssl_ca_certs"), query.Get("ssl_certfile"), query.Get("ssl_keyfile")}
		if err := files.apply(options.TLSConfig); err != nil {
			return nil, err
		}
	}
	options.DialTimeout, options.ReadTimeout, options.WriteTimeout = timeout, timeout, timeout
	options.MaxRetries = -1
	return redis.NewFailoverClient(options), nil
}

// Listen hands every message of pubsub to apply until either fails, and makes sure the subscription still
// delivers: after silence without a message it pings, and no answer within silence more is an error (an
// open connection that delivers nothing: a stopped Redis, a dropped NAT entry). after runs after every
// message or silence, for work of the follower's own (a periodic resync).
func Listen(ctx context.Context, pubsub *redis.PubSub, silence time.Duration, apply func(payload string) error,
	after func() error) error {
	pinged := false
	for {
		message, err := pubsub.ReceiveTimeout(ctx, silence)
		var netErr net.Error
		switch {
		case errors.As(err, &netErr) && netErr.Timeout():
			if pinged {
				return fmt.Errorf("no answer on the subscription for %s", 2*silence)
			}
			if err := pubsub.Ping(ctx); err != nil {
				return fmt.Errorf("pinging the subscription: %w", err)
			}
			pinged = true
		case err != nil:
			return fmt.Errorf("reading the subscription: %w", err)
		default:
			pinged = false
			if m, ok := message.(*redis.Message); ok {
				if err := apply(m.Payload); err != nil {
					return err
				}
			}
		}
		if err := after(); err != nil {
			return err
		}
	}
}

// chunk is how many keys one MGET reads: a snapshot of thousands of keys in a few round trips, none long.
const chunk = 500

// MGet reads keys in chunks of 500 and hands each value found to each (missing keys are skipped).
func MGet(ctx context.Context, client redis.UniversalClient, keys []string, each func(value string)) error {
	for start := 0; start < len(keys); start += chunk {
		values, err := client.MGet(ctx, keys[start:min(start+chunk, len(keys))]...).Result()
		if err != nil {
			return err
		}
		for _, value := range values {
			if text, ok := value.(string); ok {
				each(text)
			}
		}
	}
	return nil
}
