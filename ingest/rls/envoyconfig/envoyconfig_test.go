package envoyconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/throttlex/throttlex/ingest/rls/settings"
)

var shipped = filepath.Join("..", "..", "..", "deploy", "envoy", "envoy.yaml")

func TestTheShippedEnvoyConfigurationIsValidAndAsksThrottleX(t *testing.T) {
	bootstrap, err := Load(shipped)
	if err != nil {
		t.Fatal(err)
	}
	manager := &hcmv3.HttpConnectionManager{}
	if err := bootstrap.GetStaticResources().GetListeners()[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(manager); err != nil {
		t.Fatal(err)
	}
	filter := &ratelimitv3.RateLimit{}
	if err := manager.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(filter); err != nil {
		t.Fatal(err)
	}
	if got := filter.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != "throttlex_rls" {
		t.Fatalf("the rate-limit filter asks %q", got)
	}
	checked := 0
	for _, route := range manager.GetRouteConfig().GetVirtualHosts()[0].GetRoutes() {
		for _, limits := range route.GetRoute().GetRateLimits() {
			checked++
			for _, action := range limits.GetActions() {
				key := action.GetRequestHeaders().GetDescriptorKey()
				switch {
				case action.GetRemoteAddress() != nil:
					key = "remote_address"
				case action.GetGenericKey() != nil:
					key = action.GetGenericKey().GetDescriptorKey()
				}
				if _, mapped := settings.DefaultDescriptors[key]; !mapped {
					t.Errorf("route %s sends a descriptor entry %q that throttlex-rls does not map", route.GetMatch().GetPrefix(), key)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no route is rate limited")
	}
}

// The check is Envoy's schema, not a YAML parse: a configuration Envoy would refuse is refused here.
func TestAConfigurationEnvoyWouldRefuseIsRefused(t *testing.T) {
	raw, err := os.ReadFile(shipped)
	if err != nil {
		t.Fatal(err)
	}
	broken := map[string]string{
		"an unknown field":          strings.Replace(string(raw), "failure_mode_deny:", "failure_mode_denied:", 1),
		"a rate limit of no domain": strings.Replace(string(raw), "domain: throttlex", `domain: ""`, 1),
		"a port out of range":       strings.Replace(string(raw), "port_value: 10000", "port_value: 100000", 1),
	}
	for name, text := range broken {
		path := filepath.Join(t.TempDir(), "envoy.yaml")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Load(path); err == nil {
			t.Errorf("%s was accepted", name)
		}
	}
}
