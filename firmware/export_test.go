package firmware

// SetCrash makes Stage stop (as a crash would) at the step for which f
// returns an error.
func (s *Slots) SetCrash(f func(step string) error) { s.crash = f }

// SetCrash makes the Images stop (as a crash would) at the step for
// which f returns an error: "writing PHASE", "running CMD", "CMD ran".
func (im *Images) SetCrash(f func(step string) error) { im.crash = f }

// SetBootID replaces the kernel's boot id (a test reboots by changing
// what f returns).
func (im *Images) SetBootID(f func() (string, error)) { im.bootID = f }
