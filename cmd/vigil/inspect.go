package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/cli"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/shard"
)

// inspectFlags are the flags `shards` and `owner` share.
type inspectFlags struct {
	replicaConfig
	output string
}

func (f *inspectFlags) register(name, synopsis string, stderr io.Writer) *cliFlagSet {
	fs := cli.NewFlagSet(name, synopsis, stderr)
	fs.StringVar(&f.EtcdEndpoints, "etcd-endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	fs.StringVar(&f.EtcdPrefix, "etcd-prefix", "/vigil", "etcd key prefix")
	fs.StringVar(&f.EtcdCAFile, "etcd-ca-file", "", "CA bundle for etcd TLS")
	fs.StringVar(&f.EtcdCertFile, "etcd-cert-file", "", "client certificate for etcd TLS")
	fs.StringVar(&f.EtcdKeyFile, "etcd-key-file", "", "client key for etcd TLS")
	f.etcdAuthFlags(fs)
	fs.StringVar(&f.Cluster, "cluster", "default", "cluster name")
	fs.StringVar(&f.output, "output", "table", "output: table or json")
	f.LeaseTTL = 4 * time.Second
	return &cliFlagSet{fs}
}

// clusterState is what etcd says about a cluster's ownership.
type clusterState struct {
	Shards  int               `json:"shards"`
	Leader  string            `json:"leader"`
	Members map[string]string `json:"members"`
	Assign  map[int]string    `json:"-"`
	Owners  map[int]string    `json:"-"`
}

func readCluster(ctx context.Context, c *replicaConfig) (*clusterState, error) {
	// The commands print to stdout; the etcd client's warnings go to stderr.
	cli, err := newEtcdClient(c, hclog.New(&hclog.LoggerOptions{Name: "etcd", Level: hclog.Warn, Output: os.Stderr}))
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	L := election.NewLayout(c.EtcdPrefix, c.Cluster)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, L.Root+"/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", L.Root, describeEtcdErr(c, err))
	}
	st := &clusterState{Members: map[string]string{}, Assign: map[int]string{}, Owners: map[int]string{}}
	var leaderRev int64
	for _, k := range resp.Kvs {
		if string(k.Key) == L.Config() {
			var cfg election.ClusterConfig
			if err := json.Unmarshal(k.Value, &cfg); err != nil || cfg.Shards < 1 {
				return nil, fmt.Errorf("cluster config %s is invalid: %q", L.Config(), k.Value)
			}
			st.Shards = cfg.Shards
		}
	}
	if st.Shards == 0 {
		return nil, fmt.Errorf("no cluster at %s (no config key)", L.Root)
	}
	for _, k := range resp.Kvs {
		key := string(k.Key)
		switch {
		case strings.HasPrefix(key, L.MembersPrefix()):
			st.Members[strings.TrimPrefix(key, L.MembersPrefix())] = string(k.Value)
		case strings.HasPrefix(key, L.LeaderPrefix()):
			if leaderRev == 0 || k.CreateRevision < leaderRev {
				leaderRev, st.Leader = k.CreateRevision, string(k.Value)
			}
		case strings.HasPrefix(key, L.AssignPrefix()):
			if n, err := shard.ParseKey(strings.TrimPrefix(key, L.AssignPrefix()), st.Shards); err == nil {
				st.Assign[n] = string(k.Value)
			}
		case strings.HasPrefix(key, L.ShardsPrefix()):
			if n, err := shard.ParseKey(strings.TrimPrefix(key, L.ShardsPrefix()), st.Shards); err == nil {
				st.Owners[n] = string(k.Value)
			}
		}
	}
	return st, nil
}

type shardRow struct {
	Shard    int    `json:"shard"`
	Owner    string `json:"owner"`
	Assigned string `json:"assigned"`
}

func runShards(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f inspectFlags
	fs := f.register("vigil shards", "Print every shard with its actual owner and the owner the leader assigned.", stderr)
	if err := cli.Parse(fs.FlagSet, args); err != nil {
		return usageErr(err)
	}
	if f.output != "table" && f.output != "json" {
		return usageErr(fmt.Errorf("--output %q: want table or json", f.output))
	}
	st, err := readCluster(ctx, &f.replicaConfig)
	if err != nil {
		return err
	}
	rows := make([]shardRow, st.Shards)
	perOwner := map[string]int{}
	for s := range rows {
		rows[s] = shardRow{Shard: s, Owner: st.Owners[s], Assigned: st.Assign[s]}
		perOwner[st.Owners[s]]++
	}
	if f.output == "json" {
		enc := json.NewEncoder(stdout)
		return enc.Encode(map[string]any{"shards": rows, "leader": st.Leader, "members": st.Members})
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHARD\tOWNER\tASSIGNED")
	for _, r := range rows {
		owner, assigned := r.Owner, r.Assigned
		if owner == "" {
			owner = "-"
		}
		if assigned == "" {
			assigned = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", shard.Key(r.Shard), owner, assigned)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "\nleader: %s\n", orDash(st.Leader))
	for m := range st.Members {
		fmt.Fprintf(stdout, "member %s owns %d shards\n", m, perOwner[m])
	}
	if n := perOwner[""]; n > 0 {
		fmt.Fprintf(stdout, "unowned shards: %d\n", n)
	}
	return nil
}

func runOwner(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f inspectFlags
	fs := f.register("vigil owner <host-id>", "Print the shard of a host (UUID or host-… id) and the replica that owns it.", stderr)
	pos, err := cli.ParsePositional(fs.FlagSet, args)
	if err != nil {
		return usageErr(err)
	}
	if len(pos) != 1 {
		return usageErr(fmt.Errorf("want exactly one host id, got %d arguments", len(pos)))
	}
	host := pos[0]
	id, err := uuid.Parse(host)
	if err != nil {
		if id, err = ids.ParseHost(host); err != nil {
			return usageErr(fmt.Errorf("host id %q is neither a UUID nor a host-… id", host))
		}
	}
	st, err := readCluster(ctx, &f.replicaConfig)
	if err != nil {
		return err
	}
	s := shard.Of(id, st.Shards)
	if f.output == "json" {
		return json.NewEncoder(stdout).Encode(map[string]any{"host": id.String(), "host_id": ids.Host(id), "shard": s, "owner": st.Owners[s], "assigned": st.Assign[s]})
	}
	fmt.Fprintf(stdout, "host %s (%s)\nshard %s\nowner %s\nassigned %s\n", id, ids.Host(id), shard.Key(s), orDash(st.Owners[s]), orDash(st.Assign[s]))
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

type cliFlagSet struct{ *flag.FlagSet }
