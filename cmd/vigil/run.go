package main

import (
	"context"
	"crypto/rand"
	"io"

	"github.com/vigil-sh/vigil/internal/cli"
)

var randRead = rand.Read

func runRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var c replicaConfig
	fs := cli.NewFlagSet("vigil run", "Run one replica: join the cluster in etcd, own the shards the leader assigns, reconcile their hosts.", stderr)
	c.flags(fs)
	logFormat := fs.String("log-format", "text", "log format: text or json")
	logLevel := fs.String("log-level", "info", "log level: trace, debug, info, warn, error")
	if err := cli.Parse(fs, args); err != nil {
		return usageErr(err)
	}
	log, err := cli.NewLogger("vigil", *logFormat, *logLevel, stderr)
	if err != nil {
		return usageErr(err)
	}
	return runReplica(ctx, c, log.With("replica", c.ReplicaID), nil)
}
