package trigger

import "testing"

func TestFiresCoalesce(t *testing.T) {
	tr := New()
	select {
	case <-tr.C():
		t.Fatal("a new trigger is pending")
	default:
	}
	for range 5 {
		tr.Fire()
	}
	<-tr.C()
	select {
	case <-tr.C():
		t.Fatal("five Fires gave two wake-ups")
	default:
	}
	tr.Fire()
	<-tr.C()
}
