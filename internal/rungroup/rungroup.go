// Package rungroup runs the long-running parts of a daemon as one group,
// as both the agent and the station run theirs: each part is a Run(ctx)
// error, the first part to fail cancels the others, and the group returns
// once every part has returned.
package rungroup

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// Part is one long-running component. Run returns nil (or its context's
// error) when its context ends; an error, or any return before the
// context ended, stops the group.
type Part struct {
	// Name prefixes the part's error ("uplink: …"); empty adds nothing.
	Name string
	Run  func(context.Context) error
}

// Run runs parts until ctx ends or one of them returns; then it cancels
// the others and waits for them. It returns the first error a part
// returned; a part's context error after the group stopped is a clean
// stop, not an error.
func Run(ctx context.Context, parts ...Part) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for _, p := range parts {
		wg.Go(func() {
			err := p.Run(ctx)
			if err != nil && !stopped(ctx, err) {
				once.Do(func() {
					if p.Name != "" {
						err = fmt.Errorf("%s: %w", p.Name, err)
					}
					first = err
				})
			}
			cancel()
		})
	}
	wg.Wait()
	return first
}

// stopped reports whether err only says that ctx ended.
func stopped(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded))
}
