package service

import (
	"errors"
	"strings"
	"unicode/utf8"

	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Codec is gRPC's protobuf codec, except that a RateLimitRequest whose strings are not valid UTF-8 is read
// with each invalid byte replaced (U+FFFD) instead of refused. Envoy copies header values byte for byte into
// descriptor entries, and an HTTP header may carry bytes a proto3 string may not; refused, such a call would
// be an error, and an error is admitted by Envoy's failure_mode_deny: false. So a key sent as "k\xff" is an
// unknown key (refused with the registry), never a way past the check.
type Codec struct {
	encoding.CodecV2
}

// NewCodec wraps the protobuf codec gRPC registers.
func NewCodec() Codec { return Codec{encoding.GetCodecV2("proto")} }

// Unmarshal reads data into v, repairing the strings of a RateLimitRequest if they are not valid UTF-8.
func (c Codec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	request, isRequest := v.(*ratelimitv3.RateLimitRequest)
	if err == nil || !isRequest {
		return err
	}
	repaired, changed, repairErr := repairRequest(data.Materialize())
	if repairErr != nil || !changed {
		return err
	}
	return proto.Unmarshal(repaired, request)
}

// The field numbers of the messages whose strings are repaired.
const (
	requestDomain      = 1 // RateLimitRequest.domain
	requestDescriptors = 2 // RateLimitRequest.descriptors
	descriptorEntries  = 1 // RateLimitDescriptor.entries
	entryKey           = 1 // RateLimitDescriptor.Entry.key
	entryValue         = 2 // RateLimitDescriptor.Entry.value
)

var errMalformed = errors.New("malformed protobuf")

// repairRequest rewrites the string fields of a RateLimitRequest (the domain and every descriptor entry's key
// and value) as valid UTF-8; every other field is kept as it was.
func repairRequest(raw []byte) ([]byte, bool, error) {
	return rewrite(raw, func(number protowire.Number, value []byte) ([]byte, bool, error) {
		switch number {
		case requestDomain:
			return validUTF8(value)
		case requestDescriptors:
			return rewrite(value, func(number protowire.Number, value []byte) ([]byte, bool, error) {
				if number != descriptorEntries {
					return value, false, nil
				}
				return rewrite(value, func(number protowire.Number, value []byte) ([]byte, bool, error) {
					if number == entryKey || number == entryValue {
						return validUTF8(value)
					}
					return value, false, nil
				})
			})
		}
		return value, false, nil
	})
}

// rewrite copies a message field by field, passing each length-delimited field's bytes through change.
func rewrite(raw []byte, change func(protowire.Number, []byte) ([]byte, bool, error)) ([]byte, bool, error) {
	out, changed := make([]byte, 0, len(raw)), false
	for len(raw) > 0 {
		number, kind, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return nil, false, errMalformed
		}
		if kind != protowire.BytesType {
			m := protowire.ConsumeFieldValue(number, kind, raw[n:])
			if m < 0 {
				return nil, false, errMalformed
			}
			out, raw = append(out, raw[:n+m]...), raw[n+m:]
			continue
		}
		value, m := protowire.ConsumeBytes(raw[n:])
		if m < 0 {
			return nil, false, errMalformed
		}
		replaced, did, err := change(number, value)
		if err != nil {
			return nil, false, err
		}
		out = protowire.AppendBytes(protowire.AppendTag(out, number, kind), replaced)
		raw, changed = raw[n+m:], changed || did
	}
	return out, changed, nil
}

func validUTF8(value []byte) ([]byte, bool, error) {
	if utf8.Valid(value) {
		return value, false, nil
	}
	return []byte(strings.ToValidUTF8(string(value), "\uFFFD")), true, nil
}
