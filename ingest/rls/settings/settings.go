// Package settings declares every environment variable throttlex-rls reads, with its default. The names
// are those of the Python roles wherever the setting is shared (THROTTLEX_REDIS_URL, THROTTLEX_KEY_SALT…),
// so one deployment's environment configures both.
package settings

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Settings is the whole configuration of one throttlex-rls process.
type Settings struct {
	GRPCAddr    string // THROTTLEX_RLS_GRPC_ADDR: where Envoy calls ShouldRateLimit (and the gRPC health service)
	MetricsAddr string // THROTTLEX_RLS_METRICS_ADDR: Prometheus /metrics; empty: none
	Name        string // THROTTLEX_GATEWAY_NAME: this service's name on its events (source rls:<name>)

	RedisURL     string        // THROTTLEX_REDIS_URL
	RedisPrefix  string        // THROTTLEX_REDIS_PREFIX
	RedisTimeout time.Duration // THROTTLEX_REDIS_TIMEOUT_S

	KafkaBootstrap    []string // THROTTLEX_KAFKA_BOOTSTRAP
	KafkaProtocol     string   // THROTTLEX_KAFKA_SECURITY_PROTOCOL: PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
	KafkaMechanism    string   // THROTTLEX_KAFKA_SASL_MECHANISM: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
	KafkaUsername     string   // THROTTLEX_KAFKA_SASL_USERNAME
	KafkaPassword     string   // THROTTLEX_KAFKA_SASL_PASSWORD
	KafkaCAFile       string   // THROTTLEX_KAFKA_SSL_CAFILE
	EventsTopic       string   // THROTTLEX_EVENTS_TOPIC
	ProducerLinger    time.Duration
	ProducerBufferMax int // THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS: events held undelivered; beyond it they are dropped, counted

	KeySalt        []byte // THROTTLEX_KEY_SALT
	AllowDevSecret bool   // THROTTLEX_ALLOW_DEV_SECRETS
	Tenant         string // THROTTLEX_TENANT: the tenant of events when keys are not checked
	EdgeKeys       string // THROTTLEX_EDGE_KEYS: registry (only registered, active keys pass) or any
	UnknownKeyTTL  time.Duration
	TrustedProxies []string // THROTTLEX_TRUSTED_PROXIES

	FailMode       string        // THROTTLEX_EDGE_FAIL_MODE: open or closed
	FailAfter      time.Duration // THROTTLEX_EDGE_FAIL_AFTER_S
	ResyncInterval time.Duration // THROTTLEX_EDGE_RESYNC_INTERVAL_S

	Descriptors   map[string]string // THROTTLEX_RLS_DESCRIPTORS: descriptor entry key -> what it carries
	RequestWindow time.Duration     // THROTTLEX_RLS_REQUEST_ID_WINDOW_S: how long a request id is remembered
}

// DevSalt is the development salt; a process refuses it unless THROTTLEX_ALLOW_DEV_SECRETS is set.
const DevSalt = "throttlex-dev-salt"

var placeholders = map[string]bool{DevSalt: true, "change-me": true, "change-me-in-production": true,
	"changeme": true, "secret": true, "password": true, "": true}

// DefaultDescriptors maps the entries Envoy's common rate-limit actions produce (deploy/envoy/envoy.yaml
// configures them) onto ThrottleX's dimensions and the request's other facts.
var DefaultDescriptors = map[string]string{
	"remote_address":  "ip",
	"api_key":         "api_key",
	"tenant":          "tenant",
	"route":           "route",
	"generic_key":     "route",
	"method":          "method",
	"request_id":      "request_id",
	"x-forwarded-for": "forwarded_for",
	"forwarded":       "forwarded",
}

// Roles are what a descriptor entry may carry.
var Roles = map[string]bool{"api_key": true, "tenant": true, "ip": true, "route": true, "method": true,
	"request_id": true, "forwarded_for": true, "forwarded": true, "ignore": true}

// FromEnv reads the settings; the error names the variable and what it wants.
func FromEnv() (Settings, error) {
	return parse(os.LookupEnv)
}

func parse(lookup func(string) (string, bool)) (Settings, error) {
	r := reader{lookup: lookup}
	host, _ := os.Hostname()
	s := Settings{
		GRPCAddr:          r.str("THROTTLEX_RLS_GRPC_ADDR", "0.0.0.0:8081"),
		MetricsAddr:       r.str("THROTTLEX_RLS_METRICS_ADDR", "0.0.0.0:9102"),
		Name:              r.str("THROTTLEX_GATEWAY_NAME", host),
		RedisURL:          r.str("THROTTLEX_REDIS_URL", "redis://127.0.0.1:6379/0"),
		RedisPrefix:       r.str("THROTTLEX_REDIS_PREFIX", "throttlex"),
		RedisTimeout:      r.seconds("THROTTLEX_REDIS_TIMEOUT_S", 1),
		KafkaBootstrap:    r.list("THROTTLEX_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
		KafkaProtocol:     strings.ToUpper(r.str("THROTTLEX_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")),
		KafkaMechanism:    strings.ToUpper(r.str("THROTTLEX_KAFKA_SASL_MECHANISM", "")),
		KafkaUsername:     r.str("THROTTLEX_KAFKA_SASL_USERNAME", ""),
		KafkaPassword:     r.str("THROTTLEX_KAFKA_SASL_PASSWORD", ""),
		KafkaCAFile:       r.str("THROTTLEX_KAFKA_SSL_CAFILE", ""),
		EventsTopic:       r.str("THROTTLEX_EVENTS_TOPIC", "throttlex.events"),
		ProducerLinger:    time.Duration(r.integer("THROTTLEX_PRODUCER_LINGER_MS", 5)) * time.Millisecond,
		ProducerBufferMax: r.integer("THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS", 100_000),
		KeySalt:           []byte(r.str("THROTTLEX_KEY_SALT", DevSalt)),
		AllowDevSecret:    r.boolean("THROTTLEX_ALLOW_DEV_SECRETS"),
		Tenant:            r.str("THROTTLEX_TENANT", "default"),
		EdgeKeys:          r.str("THROTTLEX_EDGE_KEYS", "registry"),
		UnknownKeyTTL:     r.seconds("THROTTLEX_EDGE_UNKNOWN_KEY_TTL_S", 30),
		TrustedProxies:    r.list("THROTTLEX_TRUSTED_PROXIES", ""),
		FailMode:          r.str("THROTTLEX_EDGE_FAIL_MODE", "open"),
		FailAfter:         r.seconds("THROTTLEX_EDGE_FAIL_AFTER_S", 5),
		ResyncInterval:    r.seconds("THROTTLEX_EDGE_RESYNC_INTERVAL_S", 5),
		RequestWindow:     r.seconds("THROTTLEX_RLS_REQUEST_ID_WINDOW_S", 60),
	}
	s.Descriptors = r.descriptors("THROTTLEX_RLS_DESCRIPTORS")
	if r.err != nil {
		return Settings{}, r.err
	}
	return s, s.check()
}

func (s Settings) check() error {
	switch {
	case !s.AllowDevSecret && placeholders[strings.ToLower(strings.TrimSpace(string(s.KeySalt)))]:
		return fmt.Errorf("THROTTLEX_KEY_SALT is empty, a development default or a placeholder: set a secret of your own " +
			"(or THROTTLEX_ALLOW_DEV_SECRETS=1 for a local trial)")
	case len(s.KeySalt) > 64:
		return fmt.Errorf("THROTTLEX_KEY_SALT is %d bytes; BLAKE2b takes a key of at most 64", len(s.KeySalt))
	case s.EdgeKeys != "registry" && s.EdgeKeys != "any":
		return fmt.Errorf("THROTTLEX_EDGE_KEYS is %q: registry or any", s.EdgeKeys)
	case s.FailMode != "open" && s.FailMode != "closed":
		return fmt.Errorf("THROTTLEX_EDGE_FAIL_MODE is %q: open or closed", s.FailMode)
	case s.ProducerBufferMax < 1:
		return fmt.Errorf("THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS must be at least 1")
	case s.ResyncInterval <= 0 || s.ResyncInterval > time.Minute:
		return fmt.Errorf("THROTTLEX_EDGE_RESYNC_INTERVAL_S must be more than 0 and at most 60")
	case s.RequestWindow <= 0:
		return fmt.Errorf("THROTTLEX_RLS_REQUEST_ID_WINDOW_S must be more than 0")
	case s.RedisTimeout <= 0:
		return fmt.Errorf("THROTTLEX_REDIS_TIMEOUT_S must be more than 0")
	}
	switch s.KafkaProtocol {
	case "PLAINTEXT", "SSL":
	case "SASL_PLAINTEXT", "SASL_SSL":
		if s.KafkaMechanism == "" || s.KafkaUsername == "" || s.KafkaPassword == "" {
			return fmt.Errorf("THROTTLEX_KAFKA_SECURITY_PROTOCOL=%s needs THROTTLEX_KAFKA_SASL_MECHANISM, "+
				"THROTTLEX_KAFKA_SASL_USERNAME and THROTTLEX_KAFKA_SASL_PASSWORD", s.KafkaProtocol)
		}
		switch s.KafkaMechanism {
		case "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512":
		default:
			return fmt.Errorf("THROTTLEX_KAFKA_SASL_MECHANISM is %q: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", s.KafkaMechanism)
		}
	default:
		return fmt.Errorf("THROTTLEX_KAFKA_SECURITY_PROTOCOL is %q: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", s.KafkaProtocol)
	}
	return nil
}

type reader struct {
	lookup func(string) (string, bool)
	err    error
}

func (r *reader) str(name, fallback string) string {
	if value, ok := r.lookup(name); ok {
		return value
	}
	return fallback
}

func (r *reader) list(name, fallback string) []string {
	var out []string
	for _, part := range strings.Split(r.str(name, fallback), ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

func (r *reader) integer(name string, fallback int) int {
	text, ok := r.lookup(name)
	if !ok {
		return fallback
	}
	value, err := strconv.Atoi(strings.TrimSpace(text))
	if err != nil && r.err == nil {
		r.err = fmt.Errorf("%s is %q: a whole number", name, text)
	}
	return value
}

func (r *reader) seconds(name string, fallback float64) time.Duration {
	value := fallback
	if text, ok := r.lookup(name); ok {
		parsed, err := strconv.ParseFloat(strings.TrimSpace(text), 64)
		if (err != nil || parsed < 0) && r.err == nil {
			r.err = fmt.Errorf("%s is %q: seconds, 0 or more", name, text)
		}
		value = parsed
	}
	return time.Duration(value * float64(time.Second))
}

func (r *reader) boolean(name string) bool {
	text, _ := r.lookup(name)
	switch strings.ToLower(strings.TrimSpace(text)) {
	case "1", "true", "yes", "on":
		return true
	}
	return false
}

// descriptors reads "entry=role,entry=role" on top of DefaultDescriptors ("entry=ignore" drops a default).
func (r *reader) descriptors(name string) map[string]string {
	out := make(map[string]string, len(DefaultDescriptors))
	for entry, role := range DefaultDescriptors {
		out[entry] = role
	}
	for _, pair := range r.list(name, "") {
		entry, role, ok := strings.Cut(pair, "=")
		entry, role = strings.TrimSpace(entry), strings.TrimSpace(role)
		if (!ok || entry == "" || !Roles[role]) && r.err == nil {
			r.err = fmt.Errorf("%s: %q is not entry=role (roles: api_key, tenant, ip, route, method, request_id, "+
				"forwarded_for, forwarded, ignore)", name, pair)
			continue
		}
		out[entry] = role
	}
	return out
}
