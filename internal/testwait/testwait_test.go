package testwait

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func TestForWaitsUntilTheConditionHolds(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			time.Sleep(Period)
			n.Add(1)
		}
	}()
	For(t, 10*time.Second, "three ticks", func() bool { return n.Load() == 3 })
}

// A condition that never holds fails the test.
func TestUntilFailsAtTheDeadline(t *testing.T) {
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Until(ft, 20*time.Millisecond, 0, "nothing", func() (bool, string) { return false, "still false" }, nil)
	}()
	<-done
	if ft.msg != "timed out after 20ms waiting for nothing: still false" {
		t.Fatalf("failure %q", ft.msg)
	}
}

// fakeT records Fatalf and ends the goroutine as testing.T does.
type fakeT struct {
	testing.TB
	msg string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
