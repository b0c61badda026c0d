package election

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/shard"
)

// Layout is the key layout of one cluster (SPEC §3.1):
//
//	<prefix>/<cluster>/config             {"shards":256,...}
//	<prefix>/<cluster>/leader/<lease hex> <replica id>
//	<prefix>/<cluster>/members/<replica>  {"addr":...,"started":...}
//	<prefix>/<cluster>/assign/<0000..>    <replica id>
//	<prefix>/<cluster>/shards/<0000..>    <replica id>
type Layout struct {
	Root string // "<prefix>/<cluster>"
}

// NewLayout joins prefix and cluster, cleaning slashes.
func NewLayout(prefix, cluster string) Layout {
	prefix = "/" + strings.Trim(prefix, "/")
	if prefix == "/" {
		prefix = ""
	}
	return Layout{Root: prefix + "/" + strings.Trim(cluster, "/")}
}

func (l Layout) Config() string          { return l.Root + "/config" }
func (l Layout) LeaderPrefix() string    { return l.Root + "/leader/" }
func (l Layout) MembersPrefix() string   { return l.Root + "/members/" }
func (l Layout) AssignPrefix() string    { return l.Root + "/assign/" }
func (l Layout) ShardsPrefix() string    { return l.Root + "/shards/" }
func (l Layout) Member(id string) string { return l.MembersPrefix() + id }
func (l Layout) Assign(n int) string     { return l.AssignPrefix() + shard.Key(n) }
func (l Layout) Shard(n int) string      { return l.ShardsPrefix() + shard.Key(n) }
func (l Layout) Leader(lease clientv3.LeaseID) string {
	return l.LeaderPrefix() + strconv.FormatInt(int64(lease), 16)
}

// ClusterConfig is the value of the config key, written once by the first
// replica of a cluster.
type ClusterConfig struct {
	Shards  int    `json:"shards"`
	Created string `json:"created,omitempty"`
}

// MemberInfo is the value of a member key.
type MemberInfo struct {
	Addr    string `json:"addr"`
	Started string `json:"started"`
	// Leaving marks a replica handing its shards over before it stops: its
	// owner keys stay valid, but the leader assigns it nothing.
	Leaving bool `json:"leaving,omitempty"`
}

// parseMemberInfo reads a member key's value.
func parseMemberInfo(v string) (MemberInfo, error) {
	var mi MemberInfo
	err := json.Unmarshal([]byte(v), &mi)
	return mi, err
}

// ValidReplicaID reports whether id can name a replica: non-empty, at most
// 128 bytes, printable ASCII without '/' or spaces.
func ValidReplicaID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("replica id %q must be 1 to 128 characters", id)
	}
	for _, c := range id {
		if c <= ' ' || c > '~' || c == '/' {
			return fmt.Errorf("replica id %q may hold only printable ASCII without spaces or '/'", id)
		}
	}
	return nil
}

func parseConfig(b []byte) (ClusterConfig, error) {
	var c ClusterConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("config is not JSON: %w", err)
	}
	if err := shard.ValidCount(c.Shards); err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	return c, nil
}

func isLeaseGone(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaseNotFound)
}
