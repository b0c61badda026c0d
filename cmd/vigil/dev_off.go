//go:build !dev

package main

import (
	"context"
	"errors"
	"io"
)

// runDev in a production build: `vigil dev` links an etcd server, the agent
// simulator and a CA generator, none of which a replica needs, so it is only
// built with -tags dev (make dev).
func runDev(_ context.Context, _ []string, _, _ io.Writer) error {
	return errors.New("this build has no `vigil dev` (it is built with -tags dev): run `make dev`, or `go run -tags dev ./cmd/vigil dev`")
}
