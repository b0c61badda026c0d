package vigiltest

import (
	"context"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/etcdtest"
)

func TestParseMetrics(t *testing.T) {
	m, err := ParseMetrics("# HELP x y\n# TYPE x counter\nx 3\nvigil_a{shard=\"1\"} 2.5\nbad line\n")
	if err != nil {
		t.Fatal(err)
	}
	if m["x"] != 3 || m[`vigil_a{shard="1"}`] != 2.5 || len(m) != 2 {
		t.Errorf("got %v", m)
	}
}

func TestLogBuffer(t *testing.T) {
	var l LogBuffer
	l.Write([]byte(`{"@message":"shard stopping","reason":"reassigned"}` + "\n" + `{"@message":"shard stopping","reason":"key_lost"}` + "\n" + "x\n"))
	if r := l.StopReasons(); r["reassigned"] != 1 || r["key_lost"] != 1 {
		t.Errorf("stop reasons %v", r)
	}
	if got := l.Tail(1); !strings.HasSuffix(got, "x") || !strings.Contains(got, "2 earlier lines") {
		t.Errorf("tail %q", got)
	}
}

// TestRecorder: claims and releases are recorded per shard with their
// tokens, an owner key written over another is reported, and the state
// tells when the cluster is settled.
func TestRecorder(t *testing.T) {
	e := etcdtest.New(t)
	cli := e.Client(t)
	layout := election.NewLayout("/vigil", "rec")
	ctx := context.Background()
	r, err := NewRecorder(ctx, cli, layout, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	lease, err := cli.Grant(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	put := func(k, v string) int64 {
		resp, err := cli.Put(ctx, k, v, clientv3.WithLease(lease.ID))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	put(layout.Member("a"), "{}")
	put(layout.Assign(0), "a")
	put(layout.Assign(1), "a")
	tok0 := put(layout.Shard(0), "a")
	put(layout.Shard(1), "a")
	waitFor(t, r, func(st Snapshot) bool { ok, _ := st.Settled(2, []string{"a"}); return ok })
	if _, err := cli.Delete(ctx, layout.Shard(0)); err != nil {
		t.Fatal(err)
	}
	put(layout.Shard(0), "a")
	put(layout.Shard(0), "b") // rewritten over a: impossible for vigil
	waitFor(t, r, func(st Snapshot) bool { return st.Owners[0].Value == "b" })
	owner, claimed, released, found := r.Tenure(0, tok0)
	if !found || owner != "a" || claimed.IsZero() || released.IsZero() {
		t.Errorf("tenure of token %d: %q %v %v %v", tok0, owner, claimed, released, found)
	}
	if h := r.History(0, 0); len(h) != 4 || h[1].Put || !h[2].Put {
		t.Errorf("history of shard 0: %v", h)
	}
	if v := r.Violations(); len(v) != 1 || !strings.Contains(v[0], "rewritten from a") {
		t.Errorf("violations %v", v)
	}
	if ok, detail := r.State().Settled(2, []string{"a"}); ok {
		t.Error("settled with shard 0 owned by a non-member")
	} else if !strings.Contains(detail, "not a wanted member") {
		t.Errorf("detail %q", detail)
	}
}

func waitFor(t *testing.T, r *Recorder, cond func(Snapshot) bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		ch := r.Changed()
		if cond(r.State()) {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("condition not met; state %s", r.State().Summary())
		}
	}
}
