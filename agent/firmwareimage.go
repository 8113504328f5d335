package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/tpm"
)

// System images ([firmware.image]): a verified release of type image is
// handed to the installer's commands (firmware.Images, its state in
// FIRMWARE/images/images.json); the system reboots into it; at the first
// start after the reboot the trial's health is checked as an agent
// trial's is, then mark_good (commit, the image counter raised) or
// mark_bad and a reboot back. Images have their own TPM counter (the
// agent's counter index + 2, or [firmware] image_counter_index), raised
// to the highest committed image svn.

// openImages opens the image installer's state, nil without
// [firmware.image].
func (a *Agent) openImages() (*firmware.Images, error) {
	fw := a.s.firmware
	if fw.image == nil {
		return nil, nil
	}
	im, err := firmware.OpenImages(filepath.Join(a.s.dir.Firmware(), "images"), *fw.image)
	if err != nil {
		return nil, err
	}
	im.MaxAttempts, im.Deadline, im.Now = fw.attempts, fw.deadline, a.clock().Now
	return im, nil
}

// waitRebooting turns ErrRebooting into waiting for the system to go
// down (the reboot command ran): the agent keeps its parts running.
func waitRebooting(ctx context.Context, err error) error {
	if !errors.Is(err, firmware.ErrRebooting) {
		return err
	}
	<-ctx.Done()
	return nil
}

// bootImage ends or continues an image trial at start: reports the last
// result not reported, checks a trial's health, commits or rolls back.
func (u *updater) bootImage(ctx context.Context, c *firmware.Client) error {
	t, err := u.images.Boot(ctx)
	u.reportLastImage(ctx, c)
	u.raiseImageCounter()
	if err != nil || t == nil {
		return err
	}
	u.d.a.log.Info("firmware: image on trial", "release", t.Name+"@"+t.Version, "attempt", t.Attempts, "deadline", t.Deadline)
	reason := u.waitHealthy(ctx, c, trialInfo{t.Name, t.Version, t.Rollout, t.Deadline})
	if ctx.Err() != nil {
		return nil
	}
	if reason != "" {
		u.d.a.log.Error("firmware: the image on trial is not healthy; rolling back", "release", t.Name+"@"+t.Version, "reason", reason)
		if err := u.images.Rollback(ctx, reason); err != nil {
			return err
		}
		u.reportLastImage(ctx, c)
		return firmware.ErrRebooting
	}
	if _, err := u.images.Commit(ctx); err != nil {
		return err
	}
	u.raiseImageCounter()
	u.reportLastImage(ctx, c)
	return nil
}

// reportLastImage reports the last image result if it was not yet.
func (u *updater) reportLastImage(ctx context.Context, c *firmware.Client) {
	st, err := u.images.State()
	if err == nil && st.Last != nil && !st.Last.Reported && u.reportResult(ctx, c, st.Last.Release, st.Last.Result, st.Last.Reason, st.Last.Rollout) {
		u.images.MarkReported(*st.Last)
	}
}

// imageSVN is the highest committed image svn.
func imageSVN(st firmware.ImageState) uint32 {
	var n uint32
	for _, v := range st.Committed {
		n = max(n, v.SVN)
	}
	return n
}

func (u *updater) raiseImageCounter() {
	if st, err := u.images.State(); err == nil {
		u.raise(u.fw.imageCounter, imageSVN(st), "image")
	}
}

// runningImages are the committed images, for the station's check.
func (u *updater) runningImages() []release.Running {
	if u.images == nil {
		return nil
	}
	st, err := u.images.State()
	if err != nil {
		return nil
	}
	var out []release.Running
	for name, v := range st.Committed {
		out = append(out, release.Running{Name: name, Version: v.Version})
	}
	return out
}

// stageImage checks an image release against the device, downloads it,
// hands it to the installer and reboots: ErrRebooting then.
func (u *updater) stageImage(ctx context.Context, c *firmware.Client, dl *firmware.Downloader, rollout string, m *release.Manifest) error {
	if err := u.acceptImage(m); errors.Is(err, errLocal) {
		return err
	} else if err != nil {
		return &refusal{err}
	}
	file, err := u.download(ctx, c, dl, rollout, m)
	if err != nil {
		return err
	}
	defer removeDownload(file)
	return u.installImage(ctx, file, m, rollout)
}

// installImage hands the verified file to the installer and reboots:
// ErrRebooting then. An install that fails is a refusal.
func (u *updater) installImage(ctx context.Context, file string, m *release.Manifest, rollout string) error {
	if err := u.images.InstallFor(ctx, file, m, rollout); err != nil {
		return &refusal{err}
	}
	u.d.a.log.Info("firmware: image installed; rebooting into it", "release", m.Name+"@"+m.Version)
	if err := u.images.Reboot(ctx); err != nil {
		return err // Boot reboots again at the next start
	}
	return firmware.ErrRebooting
}

// acceptImage applies the anti-rollback policy to an image release.
func (u *updater) acceptImage(m *release.Manifest) error {
	if u.images == nil {
		return fmt.Errorf("firmware: %s is a system image; this agent has no [firmware.image] installer", m.Name)
	}
	st, err := u.images.State()
	if err != nil {
		return fmt.Errorf("%w: %w", errLocal, err)
	}
	committed, _ := st.CommittedVersion(m.Name)
	n, err := u.d.t.Counter(u.fw.imageCounter)
	if errors.Is(err, tpm.ErrCounterAbsent) || errors.Is(err, tpm.ErrCounterUnwritten) {
		n, err = 0, nil
	}
	if err != nil {
		return fmt.Errorf("%w: reading the TPM image counter: %w", errLocal, err)
	}
	n = max(n, uint64(imageSVN(st))) // the floor, while a raise is still to be done
	return firmware.Accept(m, firmware.Device{Committed: committed, Counter: n, HW: hardware(), Board: u.fw.board, Bad: st.BadReleases()})
}
