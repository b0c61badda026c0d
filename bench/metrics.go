package main

// Reading numbers: the replicas' /metrics (Prometheus text format), the
// embedded etcd's in-process registry, and /proc for CPU, peak RSS and fds.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// sample is one series of a metric family.
type sample struct {
	labels map[string]string
	value  float64
}

// scrape is one read of a replica's /metrics.
type scrape struct {
	at   time.Time // when the answer arrived
	fams map[string][]sample
}

func (s scrape) has(name string) bool { _, ok := s.fams[name]; return ok }

// sum adds the family's series whose labels include want (nil: all). An
// absent family sums to 0.
func (s scrape) sum(name string, want map[string]string) float64 {
	var t float64
	for _, smp := range s.fams[name] {
		if matches(smp.labels, want) {
			t += smp.value
		}
	}
	return t
}

// value is the first series of an unlabelled metric.
func (s scrape) value(name string) (float64, bool) {
	f := s.fams[name]
	if len(f) == 0 {
		return 0, false
	}
	return f[0].value, true
}

// byShard maps the family's "shard" label to its value.
func (s scrape) byShard(name string) map[int]float64 {
	out := map[int]float64{}
	for _, smp := range s.fams[name] {
		if n, err := strconv.Atoi(smp.labels["shard"]); err == nil {
			out[n] = smp.value
		}
	}
	return out
}

func matches(labels, want map[string]string) bool {
	for k, v := range want {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// fetchMetrics reads and parses http://addr/metrics, uncompressed: gzip
// would cost the replica CPU the benchmark is measuring.
func fetchMetrics(ctx context.Context, addr string) (scrape, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return scrape{}, err
	}
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := adminClient.Do(req)
	if err != nil {
		return scrape{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return scrape{}, fmt.Errorf("/metrics: %d", resp.StatusCode)
	}
	fams, err := parseMetrics(resp.Body)
	return scrape{at: time.Now(), fams: fams}, err
}

// parseMetrics parses the Prometheus text exposition format: every series
// with its labels; comments, timestamps and unparsable lines are skipped.
// Histogram and summary series keep their _bucket/_sum/_count names.
func parseMetrics(r io.Reader) (map[string][]sample, error) {
	out := map[string][]sample{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels, rest, ok := splitSeries(line)
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		out[name] = append(out[name], sample{labels: labels, value: v})
	}
	return out, sc.Err()
}

// splitSeries splits `name{a="x",b="y"} rest` into its parts, unescaping
// label values.
func splitSeries(line string) (name string, labels map[string]string, rest string, ok bool) {
	i := strings.IndexAny(line, "{ \t")
	if i <= 0 {
		return "", nil, "", false
	}
	name = line[:i]
	if line[i] != '{' {
		return name, nil, line[i:], true
	}
	labels = map[string]string{}
	s := line[i+1:]
	for {
		s = strings.TrimLeft(s, ", ")
		if strings.HasPrefix(s, "}") {
			return name, labels, s[1:], true
		}
		eq := strings.IndexByte(s, '=')
		if eq <= 0 || eq+1 >= len(s) || s[eq+1] != '"' {
			return "", nil, "", false
		}
		key := strings.TrimSpace(s[:eq])
		var val strings.Builder
		j := eq + 2
		for ; j < len(s) && s[j] != '"'; j++ {
			if s[j] == '\\' && j+1 < len(s) {
				j++
				switch s[j] {
				case 'n':
					val.WriteByte('\n')
				default:
					val.WriteByte(s[j])
				}
				continue
			}
			val.WriteByte(s[j])
		}
		if j >= len(s) {
			return "", nil, "", false
		}
		labels[key] = val.String()
		s = s[j+1:]
	}
}

// etcdStats are the embedded etcd's request and write counters, read from
// this process's default Prometheus registry, where etcd registers them.
type etcdStats struct {
	Requests  float64            // unary RPCs handled plus stream messages received (keep-alives, watch requests)
	Writes    float64            // keys put plus keys deleted
	Txns      float64            // etcd_mvcc_txn_total
	Ranges    float64            // etcd_mvcc_range_total
	Proposals float64            // raft proposals committed (every write, lease grant and revoke)
	ByMethod  map[string]float64 // grpc_server_handled_total + stream messages, by method
	Present   map[string]bool    // which families exist in this etcd build
}

func readEtcdStats() (etcdStats, error) {
	s := etcdStats{ByMethod: map[string]float64{}, Present: map[string]bool{}}
	fams, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		return s, fmt.Errorf("gather etcd metrics: %w", err)
	}
	for _, mf := range fams {
		name := mf.GetName()
		for _, m := range mf.GetMetric() {
			var v float64
			switch {
			case m.Counter != nil:
				v = m.Counter.GetValue()
			case m.Gauge != nil:
				v = m.Gauge.GetValue()
			case m.Untyped != nil:
				v = m.Untyped.GetValue()
			default:
				continue
			}
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			switch name {
			case "etcd_mvcc_put_total", "etcd_mvcc_delete_total":
				s.Writes += v
			case "etcd_mvcc_txn_total":
				s.Txns += v
			case "etcd_mvcc_range_total":
				s.Ranges += v
			case "etcd_server_proposals_committed_total":
				s.Proposals += v
			case "grpc_server_handled_total":
				if labels["grpc_type"] == "unary" {
					s.Requests += v
					s.ByMethod[labels["grpc_method"]] += v
				}
			case "grpc_server_msg_received_total":
				if labels["grpc_type"] != "unary" {
					s.Requests += v
					s.ByMethod[labels["grpc_method"]] += v
				}
			default:
				continue
			}
			s.Present[name] = true
		}
	}
	return s, nil
}

func (a etcdStats) sub(b etcdStats) etcdStats {
	d := etcdStats{
		Requests: a.Requests - b.Requests, Writes: a.Writes - b.Writes, Txns: a.Txns - b.Txns,
		Ranges: a.Ranges - b.Ranges, Proposals: a.Proposals - b.Proposals,
		ByMethod: map[string]float64{}, Present: a.Present,
	}
	for k, v := range a.ByMethod {
		if dv := v - b.ByMethod[k]; dv != 0 {
			d.ByMethod[k] = dv
		}
	}
	return d
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// procCPU is a process's user+system CPU time so far.
// postgresCPU is the CPU seconds of every process named postgres (the
// server and all its backends, exited ones not counted): the machine's
// database, which the bench has to itself while it runs.
func postgresCPU() float64 {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	var sum float64
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		if v, err := procCPUWithChildren(pid); err == nil {
			sum += v
		}
	}
	return sum
}

func procCPU(pid int) (float64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	return (f[0] + f[1]) / clockTicks, nil
}

// procCPUWithChildren adds the CPU of reaped children: a backend that exits
// moves its time into the postmaster's, so the sum over all postgres
// processes only grows.
func procCPUWithChildren(pid int) (float64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	return (f[0] + f[1] + f[2] + f[3]) / clockTicks, nil
}

// procStat is a process's utime, stime, cutime and cstime, in ticks.
func procStat(pid int) ([4]float64, error) {
	var out [4]float64
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return out, err
	}
	// The command name (field 2) may hold spaces; fields count from after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return out, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return out, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	for k := range out { // utime, stime, cutime, cstime: fields 14-17
		v, err := strconv.ParseFloat(f[11+k], 64)
		if err != nil {
			return out, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
		}
		out[k] = v
	}
	return out, nil
}

// procStatusBytes reads a "kB" field of /proc/<pid>/status, e.g. VmHWM, the
// peak resident set size.
func procStatusBytes(pid int, field string) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		if err != nil {
			return 0, err
		}
		return kb * 1024, nil
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// procFDs counts a process's open file descriptors.
func procFDs(pid int) (float64, error) {
	d, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return float64(len(d)), err
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
