package senml

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// ParseJSON reads an application/senml+json pack and validates it. Errors
// match ErrInvalid.
func ParseJSON(b []byte) (Pack, error) {
	// RFC 8428 §5 allows only UTF-8; encoding/json would quietly replace
	// what is not.
	if !utf8.Valid(b) {
		return nil, invalidf("JSON is not valid UTF-8")
	}
	// encoding/json checks the syntax; jsonScanner then walks the text
	// knowing it is well-formed, which keeps it short. It sees every label
	// in order, unlike decoding into maps, so it can reject duplicates and
	// name the record and label at fault; unlike json.Decoder's tokens, it
	// allocates little more than the strings it keeps.
	if !json.Valid(b) {
		return nil, jsonSyntaxError(b)
	}
	s := jsonScanner{b: b}
	if c := s.peek(); c != '[' {
		return nil, invalidf("pack is %s, want an array of records", jsonKind(c))
	}
	s.off++
	p := make(Pack, 0, s.records())
	for s.next(']') {
		if len(p) == MaxRecords {
			return nil, invalidf("pack has more than %d records", MaxRecords)
		}
		p = append(p, Record{})
		if err := s.record(len(p)-1, &p[len(p)-1]); err != nil {
			return nil, err
		}
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

// records counts the records of the pack the scanner is in, up to
// MaxRecords+1, without reading them, so that the pack is allocated once:
// grown by append, it would take five times its size in garbage.
func (s jsonScanner) records() int {
	n := 0
	for s.next(']') && n <= MaxRecords {
		if s.skip(2) != nil {
			break // reported when the record is read
		}
		n++
	}
	return n
}

// jsonSyntaxError describes the first syntax error in b.
func jsonSyntaxError(b []byte) error {
	var raw json.RawMessage
	err := json.Unmarshal(b, &raw)
	se, ok := errors.AsType[*json.SyntaxError](err)
	switch {
	case !ok:
		return &invalidError{msg: "malformed JSON", err: err}
	case strings.HasPrefix(se.Error(), "unexpected end"):
		return invalidf("malformed JSON: unexpected end of input")
	}
	// Offset counts the bytes read, the bad one included.
	return &invalidError{msg: fmt.Sprintf("malformed JSON at byte %d", se.Offset-1), err: err}
}

// jsonKind names the type of the JSON value that starts with c.
func jsonKind(c byte) string {
	switch c {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// jsonScanner reads JSON that json.Valid accepted, so it need not check
// the syntax.
type jsonScanner struct {
	b      []byte
	off    int
	floats floats
}

// peek returns the next byte that is not white space.
func (s *jsonScanner) peek() byte {
	for ; s.off < len(s.b); s.off++ {
		switch c := s.b[s.off]; c {
		case ' ', '\t', '\n', '\r':
		default:
			return c
		}
	}
	return 0
}

// next reports whether an array or object has another item, reading past
// the comma before it, or past the closing bracket.
func (s *jsonScanner) next(end byte) bool {
	switch s.peek() {
	case ',':
		s.off++
		return true
	case end:
		s.off++
		return false
	}
	return true
}

// str reads a string. When it has no escapes, it is a slice of the input.
func (s *jsonScanner) str() []byte {
	s.off++ // the opening quote
	start := s.off
	for {
		switch s.b[s.off] {
		case '"':
			s.off++
			return s.b[start : s.off-1]
		case '\\':
			return s.unescape(start)
		}
		s.off++
	}
}

// unescape reads the rest of a string from the first escape on, as
// encoding/json does: a surrogate that is not part of a pair becomes U+FFFD.
func (s *jsonScanner) unescape(start int) []byte {
	buf := append([]byte(nil), s.b[start:s.off]...)
	for {
		c := s.b[s.off]
		switch {
		case c == '"':
			s.off++
			return buf
		case c != '\\':
			buf = append(buf, c)
			s.off++
			continue
		}
		e := s.b[s.off+1]
		s.off += 2
		switch e {
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r := s.hex4()
			if utf16.IsSurrogate(r) {
				// Only a pair of surrogates makes a character.
				pair := utf8.RuneError
				if s.off+6 <= len(s.b) && s.b[s.off] == '\\' && s.b[s.off+1] == 'u' {
					save := s.off
					s.off += 2
					if pair = utf16.DecodeRune(r, s.hex4()); pair == utf8.RuneError {
						s.off = save
					}
				}
				r = pair
			}
			buf = utf8.AppendRune(buf, r)
		default: // '"', '\\', '/'
			buf = append(buf, e)
		}
	}
}

// hex4 reads the four hex digits of a \u escape.
func (s *jsonScanner) hex4() rune {
	var r rune
	for _, c := range s.b[s.off : s.off+4] {
		switch {
		case c <= '9':
			c -= '0'
		case c <= 'F':
			c -= 'A' - 10
		default:
			c -= 'a' - 10
		}
		r = r<<4 | rune(c)
	}
	s.off += 4
	return r
}

// number reads a number's text.
func (s *jsonScanner) number() []byte {
	start := s.off
	for ; s.off < len(s.b); s.off++ {
		switch s.b[s.off] {
		case '-', '+', '.', 'e', 'E', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
			continue
		}
		break
	}
	return s.b[start:s.off]
}

// skip reads past a value at nesting depth depth.
func (s *jsonScanner) skip(depth int) error {
	open := 0
	for {
		switch c := s.peek(); c {
		case '"':
			s.skipString()
		case '{', '[':
			if depth+open > MaxDepth {
				return invalidf("JSON nests deeper than %d at byte %d", MaxDepth, s.off)
			}
			open++
			s.off++
		case '}', ']':
			open--
			s.off++
		case ',', ':':
			s.off++
			continue
		case 't', 'n':
			s.off += 4
		case 'f':
			s.off += 5
		default:
			s.number()
		}
		if open == 0 {
			return nil
		}
	}
}

func (s *jsonScanner) skipString() {
	for s.off++; s.b[s.off] != '"'; s.off++ {
		if s.b[s.off] == '\\' {
			s.off++
		}
	}
	s.off++
}

func (s *jsonScanner) record(i int, r *Record) error {
	if c := s.peek(); c != '{' {
		return invalidf("record %d is %s, want an object", i, jsonKind(c))
	}
	s.off++
	var seen [numFields]bool
	var unknown map[string]bool
	for s.next('}') {
		s.peek()
		key := s.str()
		s.peek()
		s.off++ // the colon
		f, known := fieldByLabel(string(key))
		if !known {
			if len(key) > MaxLabelLen {
				return recordf(i, "a label is %d bytes long, more than %d", len(key), MaxLabelLen)
			}
			label := string(key)
			if strings.HasSuffix(label, "_") {
				return recordf(i, "label %q must be understood and is not supported", label)
			}
			if unknown[label] {
				return recordf(i, "label %q appears twice", label)
			}
			if unknown == nil {
				unknown = make(map[string]bool)
			}
			unknown[label] = true
			if err := s.skip(3); err != nil {
				return err
			}
			continue
		}
		if seen[f] {
			return recordf(i, "label %q appears twice", labels[f])
		}
		seen[f] = true
		if err := s.field(i, r, f); err != nil {
			return err
		}
	}
	return nil
}

// field reads the value of the known field f of record i into r.
func (s *jsonScanner) field(i int, r *Record, f field) error {
	c := s.peek()
	want := func(what string) error {
		return recordf(i, "%q is %s, want %s", labels[f], jsonKind(c), what)
	}
	switch {
	case isString(f):
		if c != '"' {
			return want("a string")
		}
		r.setString(f, string(s.str()))
	case f == fDataValue:
		if c != '"' {
			return want("a string")
		}
		v := s.str()
		p := make([]byte, base64.RawURLEncoding.DecodedLen(len(v)))
		n, err := base64.RawURLEncoding.Decode(p, v)
		if err != nil {
			return recordf(i, `"vd" is not base64url without padding`)
		}
		r.DataValue = p[:n]
	case f == fBoolValue:
		if c != 't' && c != 'f' {
			return want("a boolean")
		}
		v := c == 't'
		if v {
			s.off += len("true")
		} else {
			s.off += len("false")
		}
		r.BoolValue = &v
	case c == '-' || '0' <= c && c <= '9':
		return s.numberField(i, r, f)
	default:
		return want("a number")
	}
	return nil
}

func (s *jsonScanner) numberField(i int, r *Record, f field) error {
	n := s.number()
	switch f {
	case fBaseVersion:
		x, _ := strconv.ParseFloat(string(n), 64)
		if x > Version {
			return recordf(i, `"bver" %s is newer than version %d, not supported`, n, Version)
		}
		if x != math.Trunc(x) || x < 1 {
			return recordf(i, `"bver" %s is not a positive integer`, n)
		}
		b := int(x)
		r.BaseVersion = &b
	case fSeq:
		seq, err := strconv.ParseUint(string(n), 10, 64)
		if err != nil {
			return recordf(i, `"seq" %s is not an integer from 0 to 2^64-1`, n)
		}
		r.Seq = seq
	default:
		// Out of range, x is infinite, and Validate reports it.
		x, _ := strconv.ParseFloat(string(n), 64)
		*r.number(f) = s.floats.alloc(x)
	}
	return nil
}

// EncodeJSON validates p and writes it as application/senml+json, without
// white space. A number is written in the fewest digits that read back
// exactly, and of the forms with and without exponent in the shorter one:
// a time is 1320067464, not 1.320067464e+09 as in RFC 8428's examples.
func (p Pack) EncodeJSON() ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 64*len(p)+2)
	b = append(b, '[')
	for i := range p {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONRecord(b, &p[i])
	}
	return append(b, ']'), nil
}

// MarshalJSON is EncodeJSON, for encoding/json.
func (p Pack) MarshalJSON() ([]byte, error) { return p.EncodeJSON() }

// UnmarshalJSON is ParseJSON, for encoding/json. Like encoding/json, it
// leaves p as it is for a JSON null.
func (p *Pack) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	q, err := ParseJSON(b)
	if err != nil {
		return err
	}
	*p = q
	return nil
}

// appendJSONRecord writes r's fields in the order of labels.
func appendJSONRecord(b []byte, r *Record) []byte {
	b = append(b, '{')
	key := func(f field) {
		if b[len(b)-1] != '{' {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = append(b, labels[f]...)
		b = append(b, '"', ':')
	}
	text := func(f field, s *string) {
		if s != nil {
			key(f)
			b = appendJSONString(b, *s)
		}
	}
	number := func(f field, x *float64) {
		if x != nil {
			key(f)
			b = appendJSONNumber(b, *x)
		}
	}
	text(fBaseName, r.BaseName)
	number(fBaseTime, r.BaseTime)
	text(fBaseUnit, r.BaseUnit)
	number(fBaseValue, r.BaseValue)
	number(fBaseSum, r.BaseSum)
	if r.BaseVersion != nil {
		key(fBaseVersion)
		b = strconv.AppendInt(b, int64(*r.BaseVersion), 10)
	}
	if r.Name != "" {
		text(fName, &r.Name)
	}
	if r.Unit != "" {
		text(fUnit, &r.Unit)
	}
	number(fTime, r.Time)
	number(fUpdateTime, r.UpdateTime)
	number(fValue, r.Value)
	text(fStringValue, r.StringValue)
	if r.BoolValue != nil {
		key(fBoolValue)
		b = strconv.AppendBool(b, *r.BoolValue)
	}
	if r.DataValue != nil {
		key(fDataValue)
		b = append(b, '"')
		b = base64.RawURLEncoding.AppendEncode(b, r.DataValue)
		b = append(b, '"')
	}
	number(fSum, r.Sum)
	if r.Seq != 0 {
		key(fSeq)
		b = strconv.AppendUint(b, r.Seq, 10)
	}
	return append(b, '}')
}

// appendJSONNumber appends finite x in the shorter of its decimal and
// exponent forms, each the shortest that reads back exactly.
func appendJSONNumber(b []byte, x float64) []byte {
	start := len(b)
	b = strconv.AppendFloat(b, x, 'f', -1, 64)
	if len(b)-start <= 3 { // an exponent form has 3 bytes at least
		return b
	}
	var buf [32]byte
	e := strconv.AppendFloat(buf[:0], x, 'e', -1, 64)
	// Tidy "1e+21" to "1e21" and "1e-07" to "1e-7", as JSON allows.
	k := bytes.IndexByte(e, 'e') + 1
	digits := k
	if e[k] == '+' || e[k] == '-' {
		digits++
	}
	z := digits
	for z < len(e)-1 && e[z] == '0' {
		z++
	}
	e = append(e[:digits], e[z:]...)
	if e[k] == '+' {
		e = append(e[:k], e[k+1:]...)
	}
	if len(e) < len(b)-start {
		b = append(b[:start], e...)
	}
	return b
}

// appendJSONString quotes valid UTF-8 s, escaping what RFC 8259 requires.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
