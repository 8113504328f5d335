package collector

import (
	"context"
	"fmt"
	"strings"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/net/responsewriter"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"iotagent.dev/iotagent/telemetry/senml"
)

type (
	responseWriter = responsewriter.ResponseWriter[*udpclient.Conn]
	request        = pool.Message
)

// answer is what a request is answered.
type answer struct {
	code  codes.Code
	diag  string          // diagnostic payload (RFC 7252 §5.5.2), if any
	opts  message.Options // response options
	close bool            // close the session once the answer is sent
}

// maxDiag bounds a diagnostic payload so that the answer fits a datagram.
const maxDiag = 512

// serveCoAP answers a request of a session.
func (c *Collector) serveCoAP(ctx context.Context, w *responseWriter, r *request) {
	if !c.handlers.enter() {
		return // shutting down: no answer, the device sends again later
	}
	defer c.handlers.leave()
	s, ok := w.Conn().NetConn().(*session)
	if !ok || s.leaf == nil {
		return // not a connection of ours: cannot happen
	}
	a := c.handle(ctx, s, r)
	c.m.request(a.code)
	if err := w.SetResponse(a.code, message.TextPlain, nil, a.opts...); err != nil {
		c.log.Debug("setting response", "device", s.device, "err", err)
		return
	}
	if a.diag != "" {
		diag := a.diag
		if len(diag) > maxDiag {
			diag = strings.ToValidUTF8(diag[:maxDiag], "")
		}
		// No Content-Format: that marks a diagnostic payload.
		w.Message().SetBody(strings.NewReader(diag))
	}
	if a.close {
		cc := w.Conn()
		if !responsewriter.AfterWrite(r.Context(), func() { cc.Close() }) {
			cc.Close() // no hook (an assembled block-wise request): close without the answer
		}
	}
}

// handle decides the answer to r.
func (c *Collector) handle(ctx context.Context, s *session, r *request) answer {
	now := c.cfg.Now()
	var refusal string
	switch {
	case now.After(s.leaf.NotAfter):
		refusal = "certificate expired"
	case c.cfg.Revoked != nil && c.cfg.Revoked(s.leaf):
		refusal = "certificate revoked"
	}
	if refusal != "" {
		c.log.Info("closing session: "+refusal, "device", s.device, "serial", fmt.Sprintf("%x", s.leaf.SerialNumber))
		return answer{code: codes.Unauthorized, diag: refusal, close: true}
	}
	id, ok := telemetryPath(r.Options())
	switch {
	case !ok:
		return answer{code: codes.NotFound, diag: "POST /telemetry"}
	case r.Code() != codes.POST:
		return answer{code: codes.MethodNotAllowed, diag: "POST only"}
	case id != "" && id != s.device:
		return answer{code: codes.Forbidden, diag: fmt.Sprintf("this session is device %s", s.device)}
	}

	var decode func([]byte) (senml.Pack, error)
	switch cf, err := r.ContentFormat(); {
	case err != nil:
		return answer{code: codes.UnsupportedMediaType, diag: "Content-Format 112 or 110 required"}
	case cf == senml.ContentFormatCBOR:
		decode = senml.DecodeCBOR
	case cf == senml.ContentFormatJSON:
		decode = senml.ParseJSON
	default:
		return answer{code: codes.UnsupportedMediaType, diag: fmt.Sprintf("Content-Format %d: want 112 (senml+cbor) or 110 (senml+json)", cf)}
	}
	if n, err := r.BodySize(); err != nil {
		return answer{code: codes.BadRequest, diag: "unreadable body"}
	} else if n > int64(c.cfg.MaxPayload) {
		return c.tooLarge()
	}
	body, err := r.ReadBody()
	if err != nil {
		return answer{code: codes.BadRequest, diag: "unreadable body"}
	}
	p, err := decode(body)
	if err != nil {
		return answer{code: codes.BadRequest, diag: err.Error()}
	}
	resolved, err := p.ResolveWithin(now, resolvedPerPayload*c.cfg.MaxPayload)
	if err != nil {
		return answer{code: codes.BadRequest, diag: err.Error()}
	}
	return c.store(ctx, s.device, resolved)
}

// resolvedPerPayload bounds what a request may become once resolved, as a
// multiple of Config.MaxPayload (counted as senml.ResolveWithin does): base
// fields are copied into every record, so without it a 61 KB POST of bare
// values under one long base unit wrote 118 MB to the sink. At the default
// MaxPayload the limit is senml.MaxResolvedSize, what the agent allows a
// 64 KiB ingest line. An agent's batches hold resolved records, each with
// its own name and time, and count less than six times their size. A
// record's line in the JSON-lines sink is a small multiple of what it
// counts (the device and the time of receipt on every line, escapes).
const resolvedPerPayload = 16

func (c *Collector) tooLarge() answer {
	var opts message.Options
	buf := make([]byte, 4)
	opts, _, _ = opts.SetUint32(buf, message.Size1, uint32(c.cfg.MaxPayload))
	return answer{code: codes.RequestEntityTooLarge, diag: fmt.Sprintf("body over %d bytes", c.cfg.MaxPayload), opts: opts}
}

// telemetryPath returns whether opts name the telemetry resource, and the
// device the path names, "" for /telemetry.
func telemetryPath(opts message.Options) (device string, ok bool) {
	var segs [3]string
	n := 0
	for _, o := range opts {
		if o.ID != message.URIPath {
			continue
		}
		if n == len(segs) {
			return "", false
		}
		segs[n] = string(o.Value)
		n++
	}
	switch {
	case n == 1 && segs[0] == "telemetry":
		return "", true
	case n == 3 && segs[0] == "devices" && segs[1] != "" && segs[2] == "telemetry":
		return segs[1], true
	}
	return "", false
}

// store writes the records of p that device did not send before, then
// marks them written.
func (c *Collector) store(ctx context.Context, device string, p senml.Pack) answer {
	w := c.dedupe.lock(device)
	defer w.mu.Unlock()

	fresh := make(senml.Pack, 0, len(p))
	var batch map[uint64]struct{} // the new numbers, which may repeat within p
	var dup, unseq uint64
	reset := false
	for i := range p {
		seq := p[i].Seq
		if seq == 0 {
			unseq++
			fresh = append(fresh, p[i])
			continue
		}
		if w.restarted(seq) {
			c.log.Warn("device restarted its sequence numbers: de-duplication starts afresh", "device", device, "seq", seq, "watermark", w.low)
			w.reset()
			reset = true
			c.dedupe.resets.Add(1)
		}
		if _, again := batch[seq]; again || w.seen(seq) {
			dup++
			continue
		}
		if batch == nil {
			batch = make(map[uint64]struct{}, len(p)-i)
		}
		batch[seq] = struct{}{}
		fresh = append(fresh, p[i])
	}

	if len(fresh) > 0 {
		wctx, cancel := context.WithTimeout(ctx, c.cfg.SinkTimeout)
		err := c.cfg.Sink.Write(wctx, device, fresh)
		cancel()
		if err != nil {
			c.log.Warn("sink failed: the device will send the records again", "device", device, "records", len(fresh), "err", err)
			return answer{code: codes.ServiceUnavailable, diag: "records not stored: send them again"}
		}
	}
	for seq := range batch {
		w.mark(seq)
	}
	if batch != nil || reset {
		c.dedupe.changes.Add(1)
	}
	c.m.accepted.Add(uint64(len(fresh)))
	c.m.duplicate.Add(dup)
	c.m.unsequenced.Add(unseq)
	return answer{code: codes.Changed}
}

// monitorRequest refuses a block-wise request (RFC 7959) as soon as its
// body passes MaxPayload, before go-coap assembles more of it: go-coap's
// DTLS server sets no such limit. It answers 4.13 itself and drops the
// message.
func (c *Collector) monitorRequest(cc *udpclient.Conn, r *request) (drop bool, err error) {
	v, err := r.GetOptionUint32(message.Block1)
	if err != nil {
		return false, nil
	}
	szx, num, _, err := blockwise.DecodeBlockOption(v)
	if err != nil {
		return false, nil // go-coap answers a malformed block itself
	}
	size := num * szx.Size()
	if n, err := r.BodySize(); err == nil {
		size += n
	}
	if s1, err := r.GetOptionUint32(message.Size1); err == nil {
		size = max(size, int64(s1))
	}
	if size <= int64(c.cfg.MaxPayload) {
		return false, nil
	}
	a := c.tooLarge()
	resp := cc.AcquireMessage(cc.Context())
	defer cc.ReleaseMessage(resp)
	resp.SetCode(a.code)
	resp.SetToken(r.Token())
	resp.ResetOptionsTo(a.opts)
	resp.SetBody(strings.NewReader(a.diag))
	if r.Type() == message.Confirmable {
		resp.SetType(message.Acknowledgement)
		resp.SetMessageID(r.MessageID())
	} else {
		resp.SetType(message.NonConfirmable)
		resp.SetMessageID(cc.GetMessageID())
	}
	if err := cc.Session().WriteMessage(resp); err != nil {
		c.log.Debug("answering an oversized block", "err", err)
	}
	c.m.request(a.code)
	return true, nil
}
