package main

import (
	"bytes"
	"regexp"
	"testing"
)

func TestVersionCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := Main([]string{"version"}, &out, &errOut); code != 0 {
		t.Fatalf("vigil version exited %d: %s", code, errOut.String())
	}
	if !regexp.MustCompile(`^vigil \S+ \(revision \S+, go\S+\)\n$`).MatchString(out.String()) {
		t.Fatalf("vigil version printed %q", out.String())
	}
}
