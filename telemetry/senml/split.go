package senml

import "fmt"

// A Chunk is one uplink message cut from a pack by Split.
type Chunk struct {
	// Data is the encoding of Records, with the base fields in effect at
	// the first of them added to that one, so that the chunk alone means
	// what its records meant in the whole pack.
	Data []byte

	// Records are the records of the pack that Data carries: a subslice of
	// it, without the added base fields.
	Records Pack
}

// Seqs returns the sequence numbers of the chunk's records, to acknowledge
// them once the chunk is delivered.
func (c Chunk) Seqs() []uint64 {
	s := make([]uint64, len(c.Records))
	for i := range c.Records {
		s[i] = c.Records[i].Seq
	}
	return s
}

// Split cuts p into chunks of consecutive records, each encoded by enc in
// at most budget bytes: the MQTT uplink's message size limit, or the CoAP
// uplink's 1152-byte payload. Every record is in exactly one chunk, in
// order, and every chunk but the last is full: the next record would not
// have fitted. A record that does not fit alone is a chunk of its own,
// larger than budget; the caller decides whether to send it anyway or to
// drop and count it.
//
// enc is normally Pack.EncodeJSON or Pack.EncodeCBOR. Split calls it a few
// times per chunk, with growing and shrinking prefixes of the rest of p, so
// any other function must give encodings that do not shrink as records are
// added, must return a new slice each call and must not keep the Pack it is
// given. To learn a pack's encoded size, encode it: there is no cheaper
// exact way, as base fields make the size of a record depend on the
// records before it.
//
// Relative times (below 2^28) stay relative, to when each chunk is sent;
// resolve the pack first if that is not meant.
func (p Pack) Split(enc func(Pack) ([]byte, error), budget int) ([]Chunk, error) {
	if budget < 1 {
		return nil, fmt.Errorf("senml: split budget %d is not positive", budget)
	}
	if len(p) == 0 {
		return nil, nil
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	var (
		chunks []Chunk
		b      bases // in effect before record i
		buf    Pack
		guess  = 1 // records in the last chunk; the next is likely alike
	)
	for i := 0; i < len(p); {
		rest := len(p) - i
		encode := func(k int) ([]byte, error) {
			buf = append(buf[:0], p[i:i+k]...)
			buf[0] = b.rebase(buf[0])
			data, err := enc(buf)
			if err != nil {
				return nil, fmt.Errorf("senml: encoding records %d to %d: %w", i, i+k-1, err)
			}
			return data, nil
		}
		// Search for the most records that fit: lo fit (or is 1), hi do
		// not. Start at guess, gallop up or down, then bisect.
		lo, hi := 0, rest+1
		var loData []byte
		k, step := min(guess, rest), 1
		for {
			data, err := encode(k)
			if err != nil {
				return nil, err
			}
			switch {
			case len(data) <= budget:
				lo, loData = k, data
			case k == 1: // alone, oversize: with more it only grows
				lo, loData, hi = 1, data, 2
			default:
				hi = k
			}
			if hi-lo <= 1 {
				break
			}
			switch {
			case hi > rest:
				k = min(lo+step, rest)
			case lo == 0:
				k = max(hi-step, 1)
			default:
				k = lo + (hi-lo)/2
			}
			step *= 2
		}
		chunks = append(chunks, Chunk{Data: loData, Records: p[i : i+lo : i+lo]})
		for j := i; j < i+lo; j++ {
			b.apply(&p[j])
		}
		i += lo
		guess = lo
	}
	return chunks, nil
}

// rebase returns r with those base fields in effect that r does not set
// itself and that make a difference to it or to the records after it.
func (b *bases) rebase(r Record) Record {
	if r.BaseName == nil && b.name != "" {
		r.BaseName = new(b.name)
	}
	if r.BaseTime == nil && b.time != 0 {
		r.BaseTime = new(b.time)
	}
	if r.BaseUnit == nil && b.unit != "" {
		r.BaseUnit = new(b.unit)
	}
	if r.BaseValue == nil && b.value != nil {
		r.BaseValue = new(*b.value)
	}
	if r.BaseSum == nil && b.sum != nil {
		r.BaseSum = new(*b.sum)
	}
	if r.BaseVersion == nil && b.version != 0 && b.version != Version {
		r.BaseVersion = new(b.version)
	}
	return r
}
