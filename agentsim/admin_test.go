package agentsim

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/pgtest"
)

func TestAdminAPI(t *testing.T) {
	url := pgtest.New(t)
	s := start(t, Config{DatabaseURL: url, Hosts: 2, SandboxesPerHost: 2, HeartbeatInterval: -1})
	srv := httptest.NewServer(s.AdminHandler())
	t.Cleanup(srv.Close)
	h := s.HostIDs()[0]

	do := func(method, path, body string, wantCode int, out any) {
		t.Helper()
		req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != wantCode {
			t.Fatalf("%s %s: %d %s, want %d", method, path, resp.StatusCode, b, wantCode)
		}
		if out != nil {
			if err := json.Unmarshal(b, out); err != nil {
				t.Fatalf("%s %s: %v in %s", method, path, err, b)
			}
		}
	}

	var hosts []HostInfo
	do("GET", "/hosts", "", 200, &hosts)
	if len(hosts) != 2 || hosts[0].ID != h || hosts[0].Address != s.Address(h) || hosts[0].VMs != 2 || hosts[0].Mode.Kind != ModeHealthy {
		t.Fatalf("GET /hosts = %+v", hosts)
	}

	var info HostInfo
	do("POST", "/hosts/"+h.String()+"/mode", `{"kind":"slow","delay":"1.5s"}`, 200, &info)
	if m, _ := s.Mode(h); m.Kind != ModeSlow || m.Delay != 1500*time.Millisecond || info.Mode != m {
		t.Fatalf("mode after POST: %+v, answered %+v", m, info.Mode)
	}
	do("POST", "/hosts/"+ids.Host(h)+"/mode", `{"kind":"flap"}`, 200, &info)
	if info.Mode.Kind != ModeFlap || info.Mode.Period != DefaultFlapPeriod {
		t.Fatalf("flap by host- id: %+v", info.Mode)
	}
	do("POST", "/hosts/"+h.String()+"/mode", `{"kind":"sleepy"}`, 400, nil)
	do("POST", "/hosts/"+h.String()+"/mode", `{"kind":"slow","delay":"soon"}`, 400, nil)
	do("POST", "/hosts/"+h.String()+"/mode", `{"kind":"dead","bogus":1}`, 400, nil)
	do("POST", "/hosts/"+uuid.NewString()+"/mode", `{"kind":"dead"}`, 404, nil)
	do("POST", "/hosts/nonsense/mode", `{"kind":"dead"}`, 400, nil)
	do("POST", "/hosts/"+h.String()+"/mode", `{"kind":"healthy"}`, 200, nil)

	paused := uuid.New()
	do("POST", "/hosts/"+h.String()+"/vms", `{"id":"`+ids.Sandbox(paused)+`","status":"paused","team_id":"`+uuid.NewString()+`"}`, 200, nil)
	var vms []VM
	do("GET", "/hosts/"+h.String()+"/vms", "", 200, &vms)
	if len(vms) != 3 {
		t.Fatalf("GET vms = %+v", vms)
	}
	var dropped map[string]int
	do("POST", "/hosts/"+h.String()+"/restart", "", 200, &dropped)
	if dropped["dropped"] != 2 || len(s.VMs(h)) != 1 || s.VMs(h)[0].ID != paused {
		t.Fatalf("restart dropped %v, left %+v", dropped, s.VMs(h))
	}
	do("DELETE", "/hosts/"+h.String()+"/vms/"+paused.String(), "", 204, nil)
	do("DELETE", "/hosts/"+h.String()+"/vms/"+paused.String(), "", 404, nil)

	var records map[string][]DestroyRecord
	do("GET", "/hosts/"+h.String()+"/destroys", "", 200, &records)
	if records["accepted"] == nil || records["rejected"] == nil || len(records["accepted"]) != 0 {
		t.Fatalf("destroys = %+v", records)
	}

	var beat map[string]int
	do("POST", "/heartbeat", "", 200, &beat)
	if beat["hosts"] != 2 {
		t.Fatalf("heartbeat = %v", beat)
	}
}

func TestModeJSONRoundTrip(t *testing.T) {
	for _, m := range []Mode{
		{Kind: ModeHealthy},
		{Kind: ModeSlow, Delay: 1500 * time.Millisecond},
		{Kind: ModeFlap, Period: time.Minute, SkipHeartbeat: true},
		{Kind: ModeOversized, OversizeBytes: 123},
		{Kind: ModeUnknownStatus, Label: "hibernating"},
	} {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var got Mode
		if err := json.Unmarshal(b, &got); err != nil || got != m {
			t.Errorf("%s -> %+v, %v; want %+v", b, got, err, m)
		}
	}
}
