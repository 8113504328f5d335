// Package senml reads and writes Sensor Measurement Lists (SenML, RFC 8428)
// in JSON (application/senml+json) and CBOR (application/senml+cbor): the
// record model of the agent's telemetry, from the producers' ingest socket
// to the MQTT and CoAP uplinks.
//
// A Pack is a list of Records. ParseJSON and DecodeCBOR read one and check
// it against RFC 8428; EncodeJSON and EncodeCBOR check it and write it;
// Resolve turns it into the resolved form of RFC 8428 §4.6, where every
// record stands on its own; Split cuts it into encoded chunks that fit an
// uplink's message size and says which records each carries, so the caller
// can acknowledge them.
//
// # Sequence numbers
//
// Record.Seq is our extension of SenML, label "seq" in both encodings. The
// agent stamps every record with the device's monotonic sequence number so
// the backend can drop the duplicates of at-least-once delivery. The label
// does not end in "_", so it is not must-understand: other SenML readers
// ignore it (RFC 8428 §4.4).
//
// # Validation
//
// The parsers accept only what RFC 8428 allows and report the first fault
// with the index of the record and the label, as in
//
//	senml: record 3: "v" is a string, want a number
//
// The pack must be a non-empty array of records; a record has at most one
// of "v", "vs", "vb" and "vd", and a value or a sum unless it carries base
// fields only; names, after the base name is prepended, are non-empty, at
// most MaxNameLen bytes and made of the characters RFC 8428 §4.5.1 allows;
// numbers are finite; no label appears twice in a record; labels ending in
// "_" (must-understand extensions) are rejected, other unknown labels are
// skipped and dropped; "bver" is at most 10 and the same for every record.
// Units are free text, at most MaxUnitLen bytes, and pass through
// unchanged; see Limits for the other caps. The encoders apply the
// same checks (Pack.Validate), so whatever they write, the parsers read.
//
// # CBOR
//
// The package has its own CBOR (RFC 8949) code, limited to what SenML uses,
// rather than a general-purpose library: that keeps the agent's binary
// small and free of reflection-driven decoding of hostile input.
//
// Encoding writes definite lengths only and the preferred serialization of
// RFC 8949 §4.2.2: the shortest head for every integer and length, and for
// a number the shortest of its integer form (when it is integral, which RFC
// 8428 §6 allows) and the shortest of float16, float32 and float64 that
// holds it exactly. Map keys come in the order of the examples of RFC 8428,
// not sorted, so the encoding is preferred but not deterministic in the
// sense of RFC 8949 §4.2.1.
//
// Decoding accepts any well-formed CBOR of the types SenML uses: unsigned
// and negative integers, byte and text strings (definite or indefinite
// length), arrays and maps (definite or indefinite length), false, true,
// null, undefined and other simple values (in skipped fields), and float16,
// float32 and float64. Of the tags it accepts only tag 4, the decimal
// fraction that RFC 8428 §6 allows for numbers, with integer exponent and
// mantissa; any other tag, bytes after the pack, text that is not UTF-8 and
// every ill-formed item are errors.
//
// # Limits
//
// Hostile input cannot make a parser claim much memory: a pack has at most
// MaxRecords records (under 2 MB of them), items nest at most MaxDepth
// deep, no declared length or count is trusted beyond the bytes that are
// actually there, and skipped fields are not kept. Beyond that, what a
// parser keeps is bounded by its input, whose size it does not limit: a
// caller reading from the network bounds it first.
//
// Every text and data field kept is capped, and a pack over a cap is
// invalid, in the parsers and the encoders alike: names (base name and
// name together) at MaxNameLen bytes, units ("u", "bu") at MaxUnitLen,
// "vs" and "vd" at MaxValueLen, and the labels of skipped fields at
// MaxLabelLen.
//
// What a pack becomes when resolved is bounded too, not only what it
// holds: base fields are copied into every record, so a pack of a few
// bytes per record could otherwise stand for megabytes. Resolve counts
// the resolved records (64 bytes each plus their text and data) and fails
// past MaxResolvedSize; ResolveWithin takes another limit. Within these
// caps a record of a few bytes can still resolve to some hundred bytes
// (a name of MaxNameLen, a unit of MaxUnitLen); the resolved limit is
// what bounds the pack.
//
// # Caveats
//
// Unknown labels that are not must-understand are dropped, not preserved:
// a pack that passes through the agent loses them.
//
// Name and Unit are plain strings: an empty "n" or "u" is the same as an
// absent one, so an empty "u" does not override the base unit.
package senml
