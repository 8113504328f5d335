package firmware

// SetCrash makes Stage stop (as a crash would) at the step for which f
// returns an error.
func (s *Slots) SetCrash(f func(step string) error) { s.crash = f }
