//go:build !dev

package main

import (
	"bytes"
	"strings"
	"testing"
)

// A production build says how to get `vigil dev` instead of running it.
func TestProductionBuildHasNoDev(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := Main([]string{"dev"}, &out, &errOut); code != 1 {
		t.Fatalf("vigil dev exited %d, want 1", code)
	}
	if !strings.Contains(errOut.String(), "make dev") {
		t.Fatalf("stderr %q does not say how to run the dev cluster", errOut.String())
	}
}
