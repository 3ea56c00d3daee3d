// Command rls-client calls a rate-limit service over Envoy's own API (the RLS client types of
// go-control-plane), as Envoy does. The tests and the benchmark use it against throttlex-rls and against
// envoyproxy/ratelimit alike.
//
//	rls-client check -addr 127.0.0.1:8081
//	    one call per JSON line on stdin: {"domain": "throttlex", "descriptors": [[["api_key", "k1"], ["route", "/r"]]],
//	    "hits_addend": 1}; one JSON line per answer on stdout.
//	rls-client load -addr 127.0.0.1:8081 -concurrency 4 -duration 10s -rate 0 -keys 1000
//	    calls from concurrent callers (each its own connection), then one JSON line: checks, rate, p50, p99.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	commonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "check" && os.Args[1] != "load") {
		fmt.Fprintln(os.Stderr, "usage: rls-client check|load -addr HOST:PORT [options]; rls-client load -h for the load options")
		os.Exit(2)
	}
	var err error
	if os.Args[1] == "check" {
		err = check(os.Args[2:])
	} else {
		err = load(os.Args[2:])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rls-client:", err)
		os.Exit(1)
	}
}

func dial(addr string) (ratelimitv3.RateLimitServiceClient, *grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	return ratelimitv3.NewRateLimitServiceClient(conn), conn, nil
}

type call struct {
	Domain      string        `json:"domain"`
	Descriptors [][][2]string `json:"descriptors"`
	HitsAddend  uint32        `json:"hits_addend"`
}

type answer struct {
	Code    string            `json:"code,omitempty"`
	ResetMS []int64           `json:"reset_ms,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
	Body    string            `json:"body,omitempty"`
	Error   string            `json:"error,omitempty"`
	GRPC    string            `json:"grpc_code,omitempty"`
}

func request(c call) *ratelimitv3.RateLimitRequest {
	r := &ratelimitv3.RateLimitRequest{Domain: c.Domain, HitsAddend: c.HitsAddend}
	for _, entries := range c.Descriptors {
		d := &commonv3.RateLimitDescriptor{}
		for _, pair := range entries {
			d.Entries = append(d.Entries, &commonv3.RateLimitDescriptor_Entry{Key: pair[0], Value: pair[1]})
		}
		r.Descriptors = append(r.Descriptors, d)
	}
	return r
}

func check(args []string) error {
	flags := flag.NewFlagSet("check", flag.ExitOnError)
	addr := flags.String("addr", "127.0.0.1:8081", "the rate-limit service")
	_ = flags.Parse(args)
	client, conn, err := dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	in, out := bufio.NewScanner(os.Stdin), json.NewEncoder(os.Stdout)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		var c call
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			return fmt.Errorf("reading a call: %w", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		response, err := client.ShouldRateLimit(ctx, request(c))
		cancel()
		a := answer{}
		if err != nil {
			a.Error, a.GRPC = err.Error(), status.Code(err).String()
		} else {
			a.Code, a.Body, a.Headers = response.GetOverallCode().String(), string(response.GetRawBody()), map[string]string{}
			for _, s := range response.GetStatuses() {
				a.ResetMS = append(a.ResetMS, s.GetDurationUntilReset().AsDuration().Milliseconds())
			}
			for _, h := range response.GetResponseHeadersToAdd() {
				a.Headers[h.GetKey()] = h.GetValue()
			}
		}
		if err := out.Encode(a); err != nil {
			return err
		}
	}
	return in.Err()
}

func load(args []string) error {
	flags := flag.NewFlagSet("load", flag.ExitOnError)
	addr := flags.String("addr", "127.0.0.1:8081", "the rate-limit service")
	domain := flags.String("domain", "throttlex", "the rate-limit domain")
	concurrency := flags.Int("concurrency", 4, "concurrent callers, each on its own connection")
	duration := flags.Duration("duration", 10*time.Second, "how long to call")
	rate := flags.Float64("rate", 0, "calls per second offered in all (0: each caller calls again as soon as answered)")
	keys := flags.Int("keys", 1000, "distinct API keys (api_key entries key-0 … key-N-1)")
	prefix := flags.String("key-prefix", "key-", "what each API key starts with")
	route := flags.Bool("route", true, "add a generic_key route entry and a method entry, as deploy/envoy/envoy.yaml does")
	_ = flags.Parse(args)

	var mu sync.Mutex
	var latencies []time.Duration
	codes := map[string]int{}
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	var wg sync.WaitGroup
	started := time.Now()
	for caller := range *concurrency {
		client, conn, err := dial(*addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			random := rand.New(rand.NewPCG(uint64(caller), 7))
			var interval time.Duration
			if *rate > 0 {
				interval = time.Duration(float64(*concurrency) / *rate * float64(time.Second))
			}
			next := time.Now()
			mine, seen := make([]time.Duration, 0, 100_000), map[string]int{}
			for ctx.Err() == nil {
				if interval > 0 {
					if wait := time.Until(next); wait > 0 {
						time.Sleep(wait)
					}
					next = next.Add(interval)
				}
				entries := [][2]string{{"api_key", fmt.Sprintf("%s%d", *prefix, random.IntN(*keys))}}
				if *route {
					entries = append(entries, [2]string{"method", "GET"}, [2]string{"route", "/v1/items/{item_id}"})
				}
				sent := time.Now()
				if interval > 0 {
					sent = next.Add(-interval) // open loop: latency from when the call was due (no coordinated omission)
				}
				response, err := client.ShouldRateLimit(context.Background(), request(call{Domain: *domain, Descriptors: [][][2]string{entries}}))
				if ctx.Err() != nil {
					break
				}
				mine = append(mine, time.Since(sent))
				if err != nil {
					seen["error:"+status.Code(err).String()]++
				} else {
					seen[response.GetOverallCode().String()]++
				}
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			for code, n := range seen {
				codes[code] += n
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	slices.Sort(latencies)
	quantile := func(q float64) float64 {
		if len(latencies) == 0 {
			return 0
		}
		return float64(latencies[min(int(q*float64(len(latencies))), len(latencies)-1)].Microseconds())
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"checks": len(latencies), "seconds": elapsed, "checks_per_s": float64(len(latencies)) / elapsed,
		"p50_us": quantile(0.50), "p99_us": quantile(0.99), "codes": codes, "concurrency": *concurrency, "rate": *rate,
	})
}
