// Package envoyconfig checks an Envoy bootstrap configuration against Envoy's own schema: the message types
// of go-control-plane and the validation rules generated with them. No Envoy binary is needed, so
// deploy/envoy/envoy.yaml is checked wherever the tests run.
package envoyconfig

import (
	"fmt"
	"os"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	// The extensions deploy/envoy/envoy.yaml names, so their typed_config can be read.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

// Load reads a bootstrap configuration in YAML and validates it as Envoy would at start.
func Load(path string) (*bootstrapv3.Bootstrap, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	text, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	bootstrap := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(text, bootstrap); err != nil {
		return nil, fmt.Errorf("%s is not an Envoy bootstrap: %w", path, err)
	}
	if err := validate(bootstrap); err != nil {
		return nil, fmt.Errorf("%s breaks Envoy's rules: %w", path, err)
	}
	return bootstrap, nil
}

type validator interface{ ValidateAll() error }

// validate runs the generated rules of m and of every message inside it, including those packed in the
// typed_config of extensions (google.protobuf.Any), which the generated rules do not open.
func validate(m proto.Message) error {
	if v, ok := m.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	if packed, ok := m.(*anypb.Any); ok {
		inner, err := packed.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", packed.GetTypeUrl(), err)
		}
		return validate(inner)
	}
	var err error
	m.ProtoReflect().Range(func(field protoreflect.FieldDescriptor, value protoreflect.Value) bool {
		switch {
		case field.IsList() && field.Kind() == protoreflect.MessageKind:
			list := value.List()
			for i := 0; i < list.Len() && err == nil; i++ {
				err = validate(list.Get(i).Message().Interface())
			}
		case field.IsMap() && field.MapValue().Kind() == protoreflect.MessageKind:
			value.Map().Range(func(_ protoreflect.MapKey, v protoreflect.Value) bool {
				err = validate(v.Message().Interface())
				return err == nil
			})
		case !field.IsList() && !field.IsMap() && field.Kind() == protoreflect.MessageKind:
			err = validate(value.Message().Interface())
		}
		return err == nil
	})
	return err
}
