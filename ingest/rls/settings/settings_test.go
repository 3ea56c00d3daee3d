package settings

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The descriptor mapping is shared with `throttlex policies import-envoy` (api/envoy_import.py) through the
// conformance vectors.
func TestTheDefaultDescriptorMappingIsThePythonSides(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "tests", "conformance", "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var vectors struct {
		DescriptorRoles map[string]string `json:"descriptor_roles"`
	}
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(vectors.DescriptorRoles, DefaultDescriptors) {
		t.Fatalf("Go maps %v, the Python side %v", DefaultDescriptors, vectors.DescriptorRoles)
	}
}

func env(pairs map[string]string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		value, ok := pairs[name]
		return value, ok
	}
}

// Each bad configuration is named after the failure it causes, and the error names the variable.
func TestBadSettingsAreRefusedNamingTheVariable(t *testing.T) {
	dev := map[string]string{"THROTTLEX_ALLOW_DEV_SECRETS": "1"}
	with := func(name, value string) map[string]string {
		out := map[string]string{name: value}
		for k, v := range dev {
			out[k] = v
		}
		return out
	}
	tests := map[string]struct {
		env  map[string]string
		want string
	}{
		"the development salt without the switch": {map[string]string{}, "THROTTLEX_KEY_SALT"},
		"a placeholder salt":                      {map[string]string{"THROTTLEX_KEY_SALT": "change-me"}, "THROTTLEX_KEY_SALT"},
		"a salt longer than BLAKE2b's key":        {with("THROTTLEX_KEY_SALT", strings.Repeat("s", 65)), "at most 64"},
		"an unknown key mode":                     {with("THROTTLEX_EDGE_KEYS", "some"), "THROTTLEX_EDGE_KEYS"},
		"an unknown fail mode":                    {with("THROTTLEX_EDGE_FAIL_MODE", "half"), "THROTTLEX_EDGE_FAIL_MODE"},
		"seconds that are not a number":           {with("THROTTLEX_EDGE_FAIL_AFTER_S", "soon"), "THROTTLEX_EDGE_FAIL_AFTER_S"},
		"SASL without credentials":                {with("THROTTLEX_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"), "THROTTLEX_KAFKA_SASL_MECHANISM"},
		"a descriptor mapping to no role":         {with("THROTTLEX_RLS_DESCRIPTORS", "x-user=user"), "THROTTLEX_RLS_DESCRIPTORS"},
		"a resync that never waits":               {with("THROTTLEX_EDGE_RESYNC_INTERVAL_S", "0"), "THROTTLEX_EDGE_RESYNC_INTERVAL_S"},
		"a buffer of nothing":                     {with("THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS", "0"), "THROTTLEX_PRODUCER_BUFFER_MAX_EVENTS"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := parse(env(tt.env))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one naming %s", err, tt.want)
			}
		})
	}
	s, err := parse(env(with("THROTTLEX_RLS_DESCRIPTORS", "x-user-key=api_key,generic_key=ignore")))
	if err != nil || s.Descriptors["x-user-key"] != "api_key" || s.Descriptors["generic_key"] != "ignore" || s.Descriptors["remote_address"] != "ip" {
		t.Fatalf("settings %+v, error %v", s.Descriptors, err)
	}
}
