package contract

import (
	"net/netip"
	"regexp"
	"strings"
)

var forwardedFor = regexp.MustCompile(`(?i)for="?\[?([^]";,\s]+)`)

// ClientAddress finds the client a request is counted under (the ip dimension) behind trusted proxies, by
// the rule of ingest.client_address: a request whose peer is a trusted proxy is traced back through
// X-Forwarded-For (or, without it, Forwarded: for=) from the right, skipping trusted hops; the first
// address that is not a trusted proxy is the client.
type ClientAddress struct {
	trusted []netip.Prefix
}

// NewClientAddress takes addresses or networks ("10.0.0.0/8"); none: the peer is always the client.
func NewClientAddress(trusted []string) (*ClientAddress, error) {
	c := &ClientAddress{}
	for _, proxy := range trusted {
		proxy = strings.TrimSpace(proxy)
		if proxy == "" {
			continue
		}
		prefix, err := parseNetwork(proxy)
		if err != nil {
			return nil, err
		}
		c.trusted = append(c.trusted, prefix)
	}
	return c, nil
}

func parseNetwork(text string) (netip.Prefix, error) {
	if strings.Contains(text, "/") {
		prefix, err := netip.ParsePrefix(text)
		if err != nil {
			return netip.Prefix{}, err
		}
		return prefix.Masked(), nil
	}
	addr, err := netip.ParseAddr(text)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(addr, addr.BitLen()), nil
}

// Enabled says whether any proxy is trusted.
func (c *ClientAddress) Enabled() bool { return len(c.trusted) > 0 }

// Of is the client of a connection from peer carrying these X-Forwarded-For and Forwarded values ("" and
// hasXFF/hasForwarded false: absent).
func (c *ClientAddress) Of(peer string, xff string, hasXFF bool, forwarded string, hasForwarded bool) string {
	if !c.Enabled() || !c.isTrusted(peer) {
		return peer
	}
	var hops []string
	switch {
	case hasXFF:
		hops = strings.Split(xff, ",")
	case hasForwarded:
		for _, match := range forwardedFor.FindAllStringSubmatch(forwarded, -1) {
			hops = append(hops, match[1])
		}
	default:
		return peer
	}
	client := peer
	for i := len(hops) - 1; i >= 0; i-- {
		address, ok := hopAddress(hops[i])
		if !ok {
			return client // garbage in the chain: nothing to its left can be trusted
		}
		client = address
		if !c.isTrusted(address) {
			return client
		}
	}
	return client
}

func (c *ClientAddress) isTrusted(address string) bool {
	addr, err := netip.ParseAddr(address)
	if err != nil {
		return false
	}
	for _, prefix := range c.trusted {
		if prefix.Contains(addr) {
			return true
		}
	}
	return false
}

// hopAddress reads one hop: 203.0.113.7, 203.0.113.7:4711, [2001:db8::1]:4711 or 2001:db8::1.
func hopAddress(hop string) (string, bool) {
	text := strings.Trim(strings.TrimSpace(hop), `"`)
	if strings.HasPrefix(text, "[") {
		text, _, _ = strings.Cut(text[1:], "]")
	} else if strings.Count(text, ":") == 1 {
		text, _, _ = strings.Cut(text, ":")
	}
	addr, err := netip.ParseAddr(text)
	if err != nil {
		return "", false
	}
	return addr.String(), true
}
