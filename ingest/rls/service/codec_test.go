package service

import (
	"context"
	"testing"

	commonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// A request as Envoy writes it when a header carries a byte a proto3 string may not: built field by field,
// since Go's own encoder refuses such a string.
func requestWithKey(key string) []byte {
	entry := protowire.AppendBytes(protowire.AppendTag(nil, entryKey, protowire.BytesType), []byte("api_key"))
	entry = protowire.AppendBytes(protowire.AppendTag(entry, entryValue, protowire.BytesType), []byte(key))
	descriptor := protowire.AppendBytes(protowire.AppendTag(nil, descriptorEntries, protowire.BytesType), entry)
	raw := protowire.AppendBytes(protowire.AppendTag(nil, requestDomain, protowire.BytesType), []byte("throttlex"))
	raw = protowire.AppendBytes(protowire.AppendTag(raw, requestDescriptors, protowire.BytesType), descriptor)
	return protowire.AppendVarint(protowire.AppendTag(raw, 3, protowire.VarintType), 4) // hits_addend
}

func TestAKeyThatIsNotUTF8IsReadAndRefusedNotAnErrorEnvoyWouldAdmit(t *testing.T) {
	raw := requestWithKey("good-key\xff")
	if err := proto.Unmarshal(raw, &ratelimitv3.RateLimitRequest{}); err == nil {
		t.Fatal("protobuf accepted invalid UTF-8: this test no longer shows the defect")
	}
	request := &ratelimitv3.RateLimitRequest{}
	if err := NewCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(raw)}, request); err != nil {
		t.Fatal(err)
	}
	entry := request.GetDescriptors()[0].GetEntries()[0]
	if entry.GetValue() != "good-key\uFFFD" || request.GetDomain() != "throttlex" || request.GetHitsAddend() != 4 {
		t.Fatalf("read %v", request)
	}
	svc, _, out := newService(t, true)
	response, err := svc.ShouldRateLimit(context.Background(), request)
	if err != nil || response.GetOverallCode() != ratelimitv3.RateLimitResponse_OVER_LIMIT || len(out.events) != 0 {
		t.Fatalf("response %v, error %v", response, err)
	}
}

func TestValidRequestsAndOtherMessagesAreReadAsTheProtobufCodecReadsThem(t *testing.T) {
	valid := &ratelimitv3.RateLimitRequest{Domain: "d", Descriptors: []*commonv3.RateLimitDescriptor{{
		Entries: []*commonv3.RateLimitDescriptor_Entry{{Key: "api_key", Value: "ключ"}}}}}
	raw, _ := proto.Marshal(valid)
	request := &ratelimitv3.RateLimitRequest{}
	if err := NewCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(raw)}, request); err != nil || !proto.Equal(request, valid) {
		t.Fatalf("read %v, error %v", request, err)
	}
	if err := NewCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0xff, 0xff})}, &ratelimitv3.RateLimitRequest{}); err == nil {
		t.Fatal("garbage was read")
	}
}
