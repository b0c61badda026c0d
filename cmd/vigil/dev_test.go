package main

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/redistest"
)

// bannerAdmins is the replicas' admin addresses as the banner prints them.
func bannerAdmins(out string) []string {
	var addrs []string
	for _, m := range regexp.MustCompile(`http://([0-9.:]+)/metrics`).FindAllStringSubmatch(out, -1) {
		addrs = append(addrs, m[1])
	}
	return addrs
}

// `vigil dev --agent-tls` is a whole cluster over the production transport:
// two replicas own every shard and reconcile every host over mutual TLS with
// a CA made for the run; Ctrl-C stops it cleanly.
func TestDevClusterOverMutualTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test with real processes; skipped in -short mode")
	}
	bin := vigilBinary(t)
	dbURL := pgtest.New(t)
	stream := "vigil-e2e:dev:" + uuid.NewString()[:8] + ":events"
	rdb := redis.NewClient(&redis.Options{Addr: machineRedis})
	t.Cleanup(func() {
		ctx := context.Background()
		if keys, _ := rdb.Keys(ctx, stream+"*").Result(); len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
		rdb.Close()
	})
	cmd := exec.Command(bin, "dev", "--agent-tls", "--hosts", "20", "--replicas", "2", "--shards", "16",
		"--interval", "500ms", "--lease-ttl", "2s", "--churn", "0", "--mishaps", "0",
		"--database-url", dbURL, "--events-redis-url", redistest.URL(), "--events-stream", stream,
		// Port 0 everywhere: vigil dev binds whatever is free and the banner
		// says where; ports picked here and bound later could be taken between.
		"--etcd-client-addr", "127.0.0.1:0", "--etcd-peer-addr", "127.0.0.1:0",
		"--http-base-port", "0", "--agentsim-admin-addr", "127.0.0.1:0")
	cmd.Env = cleanEnv()
	var out logBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	var reps []*replica
	deadline := time.Now().Add(60 * time.Second)
	for {
		if reps == nil {
			if a := bannerAdmins(out.String()); len(a) == 2 {
				reps = []*replica{{Admin: a[0]}, {Admin: a[1]}}
			}
		}
		owned, ok, agentErrs := 0.0, 0.0, 0.0
		for _, r := range reps {
			m, err := r.Metrics()
			if err != nil {
				continue
			}
			owned += m["vigil_shards_owned"]
			ok += m[`vigil_reconciles_total{kind="active",result="ok"}`]
			for k, v := range m {
				if strings.HasPrefix(k, "vigil_agent_rpc_errors_total") {
					agentErrs += v
				}
			}
		}
		if owned == 16 && ok >= 40 { // every host reconciled at least twice
			if agentErrs > 0 {
				t.Fatalf("%v agent RPC errors over mutual TLS\n%s", agentErrs, out.Tail(40))
			}
			break
		}
		select {
		case <-exited:
			t.Fatalf("vigil dev exited: %v\n%s", waitErr, out.Tail(40))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %v shards owned, %v successful host reconciles\n%s", owned, ok, out.Tail(40))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(out.String(), "agents over mutual TLS") {
		t.Errorf("banner does not say the agents speak mutual TLS:\n%s", out.Tail(40))
	}
	if !strings.Contains(out.String(), "XRANGE "+stream+" - +") {
		t.Errorf("banner lacks the XRANGE line of the events stream:\n%s", out.Tail(40))
	}
	// An orphan row: the dev cluster stops it and publishes capsule.destroy.
	db, err := pgx.Connect(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close(context.Background())
	orphan := uuid.New()
	if _, err := db.Exec(context.Background(), `
		insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
		select $1, team_id, id, 'running', now(), now() from hosts where team_id is not null limit 1`, orphan); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		msgs, _ := rdb.XRange(context.Background(), stream, "-", "+").Result()
		if len(msgs) > 0 && strings.Contains(fmt.Sprint(msgs[len(msgs)-1].Values["payload"]), ids.Sandbox(orphan)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no capsule.destroy for the orphan in %s after 20s (%d entries)\n%s", stream, len(msgs), out.Tail(40))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	select {
	case <-exited:
		if waitErr != nil {
			t.Fatalf("vigil dev after Ctrl-C: %v\n%s", waitErr, out.Tail(40))
		}
	case <-ctx.Done():
		t.Fatalf("vigil dev still running 30s after Ctrl-C\n%s", out.Tail(40))
	}
}
