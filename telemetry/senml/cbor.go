package senml

import (
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"
)

// The CBOR subset of this package (RFC 8949); see the package doc.

// Major types.
const (
	majorUint   = 0
	majorNint   = 1
	majorBytes  = 2
	majorText   = 3
	majorArray  = 4
	majorMap    = 5
	majorTag    = 6
	majorSimple = 7
)

// Additional information of major type 7.
const (
	simpleFalse     = 20
	simpleTrue      = 21
	simpleNull      = 22
	simpleUndefined = 23
	infoFloat16     = 25
	infoFloat32     = 26
	infoFloat64     = 27
	infoIndefinite  = 31
)

const breakCode = 0xff

// tagDecimalFraction is the one tag accepted, and only for numbers.
const tagDecimalFraction = 4

// appendHead appends the initial byte and argument of an item, in the
// shortest form (RFC 8949 §4.2.1).
func appendHead(b []byte, major byte, arg uint64) []byte {
	m := major << 5
	switch {
	case arg < 24:
		return append(b, m|byte(arg))
	case arg <= math.MaxUint8:
		return append(b, m|24, byte(arg))
	case arg <= math.MaxUint16:
		return binary.BigEndian.AppendUint16(append(b, m|25), uint16(arg))
	case arg <= math.MaxUint32:
		return binary.BigEndian.AppendUint32(append(b, m|26), uint32(arg))
	}
	return binary.BigEndian.AppendUint64(append(b, m|27), arg)
}

func appendInt(b []byte, n int64) []byte {
	if n >= 0 {
		return appendHead(b, majorUint, uint64(n))
	}
	return appendHead(b, majorNint, uint64(-1-n))
}

func appendText(b []byte, s string) []byte {
	return append(appendHead(b, majorText, uint64(len(s))), s...)
}

func appendBytes(b []byte, p []byte) []byte {
	return append(appendHead(b, majorBytes, uint64(len(p))), p...)
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, majorSimple<<5|simpleTrue)
	}
	return append(b, majorSimple<<5|simpleFalse)
}

// appendFloat appends f as the shortest of float16, float32 and float64
// that holds it exactly (RFC 8949 §4.2.2); NaN becomes the float16 quiet NaN.
func appendFloat(b []byte, f float64) []byte {
	const m = majorSimple << 5
	if math.IsNaN(f) {
		return append(b, m|infoFloat16, 0x7e, 0x00)
	}
	f32 := float32(f)
	if float64(f32) != f {
		return binary.BigEndian.AppendUint64(append(b, m|infoFloat64), math.Float64bits(f))
	}
	if h, ok := float16Bits(f); ok {
		return binary.BigEndian.AppendUint16(append(b, m|infoFloat16), h)
	}
	return binary.BigEndian.AppendUint32(append(b, m|infoFloat32), math.Float32bits(f32))
}

// appendNumber appends a SenML number: as an integer where f is integral
// and that is no longer than its float form, which RFC 8428 §6 allows,
// else as appendFloat does. -0 stays a float, to keep its sign.
func appendNumber(b []byte, f float64) []byte {
	const two64 = 1 << 64
	if f != math.Trunc(f) || f == 0 && math.Signbit(f) || f >= two64 || f <= -two64 {
		return appendFloat(b, f)
	}
	var major byte = majorUint
	arg := uint64(0)
	if f >= 0 {
		arg = uint64(f)
	} else {
		major, arg = majorNint, uint64(-f)-1
	}
	if headLen(arg) > floatLen(f) {
		return appendFloat(b, f)
	}
	return appendHead(b, major, arg)
}

// headLen is the length of the shortest head for arg.
func headLen(arg uint64) int {
	switch {
	case arg < 24:
		return 1
	case arg <= math.MaxUint8:
		return 2
	case arg <= math.MaxUint16:
		return 3
	case arg <= math.MaxUint32:
		return 5
	}
	return 9
}

// floatLen is the length of appendFloat's encoding of f, which is not NaN.
func floatLen(f float64) int {
	if float64(float32(f)) != f {
		return 9
	}
	if _, ok := float16Bits(f); ok {
		return 3
	}
	return 5
}

// float16Bits returns the IEEE 754 binary16 encoding of f if it holds f
// exactly. f must not be NaN.
func float16Bits(f float64) (uint16, bool) {
	var sign uint16
	if math.Signbit(f) {
		sign, f = 0x8000, -f
	}
	switch {
	case f == 0:
		return sign, true
	case math.IsInf(f, 0):
		return sign | 0x7c00, true
	}
	frac, exp := math.Frexp(f) // f = frac × 2^exp, 0.5 ≤ frac < 1
	e := exp - 1               // f = 1.x × 2^e
	switch {
	case e > 15:
		return 0, false
	case e >= -14: // normal: 11 significant bits
		s := math.Ldexp(frac, 11)
		if s != math.Trunc(s) {
			return 0, false
		}
		return sign | uint16(e+15)<<10 | (uint16(s) - 1024), true
	}
	s := math.Ldexp(f, 24) // subnormal: a multiple of 2^-24 below 2^-14
	if s != math.Trunc(s) {
		return 0, false
	}
	return sign | uint16(s), true
}

// float16Value is RFC 8949 Appendix D's decode_half.
func float16Value(h uint16) float64 {
	exp := int(h>>10) & 0x1f
	mant := float64(h & 0x3ff)
	var v float64
	switch exp {
	case 0:
		v = math.Ldexp(mant, -24)
	case 31:
		if mant == 0 {
			v = math.Inf(1)
		} else {
			v = math.NaN()
		}
	default:
		v = math.Ldexp(mant+1024, exp-25)
	}
	if h&0x8000 != 0 {
		return -v
	}
	return v
}

// decoder reads CBOR items from b.
type decoder struct {
	b      []byte
	off    int
	floats floats
}

// head is an item's initial byte and argument. For a float, arg holds its
// bits; for an indefinite length or a break, indefinite is set and arg is 0.
type head struct {
	major      byte
	info       byte
	arg        uint64
	indefinite bool
	off        int // where the item starts, for error messages
}

func (h head) isBreak() bool { return h.major == majorSimple && h.indefinite }

// describe names the item's type, for error messages.
func (h head) describe() string {
	switch h.major {
	case majorUint:
		return "an unsigned integer"
	case majorNint:
		return "a negative integer"
	case majorBytes:
		return "a byte string"
	case majorText:
		return "a text string"
	case majorArray:
		return "an array"
	case majorMap:
		return "a map"
	case majorTag:
		return fmt.Sprintf("tag %d", h.arg)
	}
	switch h.info {
	case simpleFalse, simpleTrue:
		return "a boolean"
	case simpleNull:
		return "null"
	case simpleUndefined:
		return "undefined"
	case infoFloat16, infoFloat32, infoFloat64:
		return "a float"
	case infoIndefinite:
		return "a break"
	}
	return "a simple value"
}

func (d *decoder) malformed(off int, format string, args ...any) error {
	return invalidf("malformed CBOR at byte %d: %s", off, fmt.Sprintf(format, args...))
}

func (d *decoder) eof() error {
	return invalidf("malformed CBOR: unexpected end of input at byte %d", len(d.b))
}

// rest is how many bytes are left.
func (d *decoder) rest() uint64 { return uint64(len(d.b) - d.off) }

// head reads an item's head. It rejects what RFC 8949 calls not
// well-formed: reserved additional information, an indefinite length on a
// type that has none, a one-byte simple value below 32.
func (d *decoder) head() (head, error) {
	if d.off >= len(d.b) {
		return head{}, d.eof()
	}
	ib := d.b[d.off]
	h := head{major: ib >> 5, info: ib & 0x1f, off: d.off}
	d.off++
	switch n := h.info; {
	case n < 24:
		h.arg = uint64(n)
	case n <= 27:
		size := 1 << (n - 24)
		if d.off+size > len(d.b) {
			return head{}, d.eof()
		}
		p := d.b[d.off : d.off+size]
		d.off += size
		switch size {
		case 1:
			h.arg = uint64(p[0])
			if h.major == majorSimple && h.arg < 32 {
				return head{}, d.malformed(h.off, "simple value %d in two bytes", h.arg)
			}
		case 2:
			h.arg = uint64(binary.BigEndian.Uint16(p))
		case 4:
			h.arg = uint64(binary.BigEndian.Uint32(p))
		default:
			h.arg = binary.BigEndian.Uint64(p)
		}
	case n == infoIndefinite:
		switch h.major {
		case majorBytes, majorText, majorArray, majorMap, majorSimple:
			h.indefinite = true
		default:
			return head{}, d.malformed(h.off, "indefinite length on major type %d", h.major)
		}
	default:
		return head{}, d.malformed(h.off, "reserved additional information %d", n)
	}
	return h, nil
}

// more reports whether a container whose head is h has another item, the
// i-th, consuming the break that ends an indefinite-length one.
func (d *decoder) more(h head, i uint64) (bool, error) {
	if !h.indefinite {
		return i < h.arg, nil
	}
	if d.off >= len(d.b) {
		return false, d.eof()
	}
	if d.b[d.off] == breakCode {
		d.off++
		return false, nil
	}
	return true, nil
}

// checkCount rejects a definite count that the rest of the input cannot
// hold, before anything is sized by it; every item takes a byte at least.
func (d *decoder) checkCount(h head, perItem uint64) error {
	if !h.indefinite && h.arg > d.rest()/perItem {
		return d.eof()
	}
	return nil
}

// str reads the content of a byte or text string whose head is h. A
// definite-length string is returned as a slice of the input.
func (d *decoder) str(h head) ([]byte, error) {
	if !h.indefinite {
		if h.arg > d.rest() {
			return nil, d.eof()
		}
		p := d.b[d.off : d.off+int(h.arg)]
		d.off += int(h.arg)
		if h.major == majorText && !utf8.Valid(p) {
			return nil, d.malformed(h.off, "text string is not valid UTF-8")
		}
		return p, nil
	}
	buf := []byte{}
	for {
		if d.off >= len(d.b) {
			return nil, d.eof()
		}
		if d.b[d.off] == breakCode {
			d.off++
			return buf, nil
		}
		c, err := d.head()
		if err != nil {
			return nil, err
		}
		if c.major != h.major || c.indefinite {
			return nil, d.malformed(c.off, "chunk of an indefinite-length string is %s", c.describe())
		}
		p, err := d.str(c) // each text chunk is valid UTF-8 by itself (RFC 8949 §3.2.3)
		if err != nil {
			return nil, err
		}
		buf = append(buf, p...)
	}
}

// skip reads past the item whose head is h, at nesting depth depth.
func (d *decoder) skip(h head, depth int) error {
	switch h.major {
	case majorBytes, majorText:
		_, err := d.str(h)
		return err
	case majorArray, majorMap:
		if depth > MaxDepth {
			return tooDeep(h.off)
		}
		per := uint64(1)
		if h.major == majorMap {
			per = 2
		}
		if err := d.checkCount(h, per); err != nil {
			return err
		}
		for i := uint64(0); ; i++ {
			ok, err := d.more(h, i)
			if err != nil {
				return err
			}
			if !ok {
				return nil
			}
			for range per {
				if err := d.skipItem(depth + 1); err != nil {
					return err
				}
			}
		}
	case majorTag:
		if h.arg == tagDecimalFraction {
			_, err := d.decimalFraction(h, depth)
			return err
		}
		return invalidf("unsupported CBOR tag %d at byte %d", h.arg, h.off)
	case majorSimple:
		if h.isBreak() {
			return d.malformed(h.off, "break outside an indefinite-length item")
		}
	}
	return nil
}

func tooDeep(off int) error {
	return invalidf("CBOR nests deeper than %d at byte %d", MaxDepth, off)
}

func (d *decoder) skipItem(depth int) error {
	h, err := d.head()
	if err != nil {
		return err
	}
	return d.skip(h, depth)
}

// float returns the value of a float item.
func (h head) float() float64 {
	switch h.info {
	case infoFloat16:
		return float16Value(uint16(h.arg))
	case infoFloat32:
		return float64(math.Float32frombits(uint32(h.arg)))
	}
	return math.Float64frombits(h.arg)
}

func (h head) isFloat() bool {
	return h.major == majorSimple && (h.info == infoFloat16 || h.info == infoFloat32 || h.info == infoFloat64)
}

// number reads a number whose head is h: an integer, a float or a decimal
// fraction. ok is false, with no error, if h is of another type.
func (d *decoder) number(h head, depth int) (v float64, ok bool, err error) {
	switch {
	case h.major == majorUint:
		return float64(h.arg), true, nil
	case h.major == majorNint:
		// -1-arg in one rounding: -1 - float64(arg) would round twice.
		if h.arg == math.MaxUint64 {
			return -0x1p64, true, nil
		}
		return -float64(h.arg + 1), true, nil
	case h.isFloat():
		return h.float(), true, nil
	case h.major == majorTag && h.arg == tagDecimalFraction:
		v, err := d.decimalFraction(h, depth)
		return v, err == nil, err
	case h.major == majorTag:
		return 0, false, invalidf("unsupported CBOR tag %d at byte %d", h.arg, h.off)
	}
	return 0, false, nil
}

// decimalFraction reads the content of tag 4 (RFC 8949 §3.4.4), an array
// of exponent and mantissa, both integers here (no bignums).
func (d *decoder) decimalFraction(tag head, depth int) (float64, error) {
	if depth+1 > MaxDepth {
		return 0, tooDeep(tag.off)
	}
	a, err := d.head()
	if err != nil {
		return 0, err
	}
	bad := func(what string) error {
		return invalidf("CBOR decimal fraction at byte %d: %s, want an array of two integers", tag.off, what)
	}
	if a.major != majorArray {
		return 0, bad("content is " + a.describe())
	}
	var ints [2]head
	n := uint64(0)
	for ; ; n++ {
		ok, err := d.more(a, n)
		if err != nil {
			return 0, err
		}
		if !ok {
			break
		}
		if n == 2 {
			return 0, bad("more than two items")
		}
		if ints[n], err = d.head(); err != nil {
			return 0, err
		}
		if m := ints[n].major; m != majorUint && m != majorNint {
			return 0, bad("an item is " + ints[n].describe())
		}
	}
	if n != 2 {
		return 0, bad(fmt.Sprintf("%d items", n))
	}
	// Beyond ±400 the result is 0 or infinite whatever the mantissa, since
	// it has at most 20 digits; clamping keeps the exponent in an int.
	exp := int64(min(ints[0].arg, 400))
	if ints[0].major == majorNint {
		exp = -1 - exp
	}
	s := strconv.FormatUint(ints[1].arg, 10) + "e" + strconv.FormatInt(exp, 10)
	if ints[1].major == majorNint {
		// -1-arg: the magnitude is arg+1, which may not fit in a uint64.
		s = "-" + addOne(strconv.FormatUint(ints[1].arg, 10)) + "e" + strconv.FormatInt(exp, 10)
	}
	// Correctly rounded; out of range it is infinite, which Validate
	// reports with the label.
	v, _ := strconv.ParseFloat(s, 64)
	return v, nil
}

// addOne adds one to a decimal number.
func addOne(s string) string {
	b := []byte(s)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] != '9' {
			b[i]++
			return string(b)
		}
		b[i] = '0'
	}
	return "1" + string(b)
}
