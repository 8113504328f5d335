package collector

import "os"

// DedupeFileSeen reports whether the de-duplication file at path holds
// seq of device as written.
func DedupeFileSeen(path, device string, seq uint64) (bool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	width, ws, err := decodeDedupe(data)
	if err != nil {
		return false, err
	}
	d := newDedupe(int(width), len(ws)+1)
	d.restore(width, ws)
	w := d.lock(device)
	defer w.mu.Unlock()
	return w.seen(seq), nil
}
