// Package store keeps the agent's durable telemetry queue, its counters
// (a meta bucket, written with the records they count) and its small state
// (a state bucket: the sealed DTLS session, …) in one bbolt file on flash.
//
// The clock floor (the last trusted time) is not kept here but in a small
// file beside the certificate (enroll.LoadClockFloor): iotagent enroll,
// status and renew need it while iotagent run holds the store's lock.
//
// The queue holds opaque records. Each gets a sequence number from a
// per-file counter that starts at 1 and only goes up: acks, drops, restarts
// and compaction never make it reuse a number, so the backend can drop
// duplicates of an at-least-once delivery by sequence number.
//
//	producers ─▶ Append ─▶ committer goroutine ─▶ one bbolt tx + fsync per group
//	uplink    ─▶ Wait, Peek ─▶ send ─▶ broker ack ─▶ Ack
//
// # Group commit
//
// Every write (Append, Ack, Put) is handed to one committer goroutine, which
// gathers what is waiting into a single transaction, so many writers pay for
// one fsync. A caller returns when the transaction holding its write is
// committed. The committer never delays a lone writer: it lingers for more
// writes (at most Options.GroupMaxDelay) only when the previous transaction
// carried appends from several callers, that is when there is evidence that
// others are about to write. db.Batch is not used because it waits its delay
// on every call even with one writer.
//
// # Bound
//
// The queue is bounded by Options.MaxBytes. A record counts as its payload
// plus RecordOverhead bytes, what its key and index entry cost in the file,
// so that a flood of tiny records is bounded as well as a few big ones. When
// an append does not fit, the oldest records are dropped in the same
// transaction and counted in a persisted counter (DropOldest), or the append
// fails with ErrFull (Reject).
//
// # Caveats
//
// Durability: Append, Ack and Put return nil only after their transaction
// is committed and fdatasync'd; that survives a crash of the process and a
// power cut, provided the flash honours cache flushes (some cheap SD cards do
// not). A write that failed with ErrFull, ErrTooLarge, ErrClosed or ctx's
// error was not stored. One whose commit failed with an I/O error (a full
// disk, say) is rolled back and the store stays usable; if the failure came
// at the very end, the flush of bbolt's meta page, the write may still
// appear after a restart. The file is consistent either way. An Ack lost to
// a power cut makes its records reappear: the queue is at-least-once.
//
// Flash wear: every commit writes at least the changed B+tree pages and a
// meta page and fsyncs. Group commit keeps this per group, not per record.
// Put is one commit per call: save state when it changes meaningfully, not
// on a timer of seconds. A file over 4 MiB whose pages in use hold more
// than twice its live data (a queue that filled during an outage and has
// drained since) is compacted, which rewrites its live data once: when it
// is opened, and while it runs, checked by the committer after a commit
// at most every 10 minutes. The copy holds up writes, not reads.
//
// File size: bbolt files never shrink in place; compaction replaces them. The file is capped by a
// hard ceiling of 2×MaxBytes + 32 MiB (see Options.MaxBytes); reaching it is
// reported as an error, never silently.
//
// 32-bit ARM: bbolt maps the whole file into the address space, which on a
// 32-bit process must be found in one contiguous piece. MaxBytes is
// therefore limited to MaxBytesLimit (128 MiB on 32-bit platforms), which
// keeps the ceiling at 288 MiB and the mapping at most 512 MiB.
//
// The freelist is not written to the file (bbolt's NoFreelistSync, which
// saves a page write per commit), so every Open and every failed commit
// rebuild it by walking the file's page tree: their time grows with the file.
//
// Sequence numbers belong to the file: a deleted or replaced file starts
// again at 1.
package store
