package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/vigil-sh/vigil/internal/cli"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/store"
)

func runShadowReport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlagSet("vigil shadow-report",
		"Compare the changes shadow mode (vigil run --shadow) would have made with the system audit rows the control plane's own monitor wrote over the same window: per kind of change, how many agreed, how many only vigil would have made, how many only the monitor made, with the ids of the disagreements.", stderr)
	db := databaseFlags(fs)
	since := fs.Duration("since", time.Hour, "the window: from this long ago")
	slack := fs.Duration("slack", 2*time.Minute, "how far apart two sightings of one change may be (at least the longer of the two loops' intervals); the window ends this long ago, so that changes near its end can still be matched")
	format := fs.String("format", "text", "output: text or json")
	if err := cli.Parse(fs, args); err != nil {
		return usageErr(err)
	}
	switch {
	case *db.url == "":
		return usageErr(fmt.Errorf("--database-url (or $VIGIL_DATABASE_URL) is required"))
	case *since <= 0:
		return usageErr(fmt.Errorf("--since %s must be positive", *since))
	case *slack < 0 || *slack >= *since:
		return usageErr(fmt.Errorf("--slack %s must be at least 0 and under --since %s", *slack, *since))
	case *format != "text" && *format != "json":
		return usageErr(fmt.Errorf("--format %q: text or json", *format))
	}
	dbURL, err := db.resolve()
	if err != nil {
		return usageErr(err)
	}
	st, err := store.Open(ctx, store.Config{URL: dbURL, MaxConns: 2, ApplicationName: "vigil shadow-report"})
	if err != nil {
		return err
	}
	defer st.Close()
	now, err := st.Now(ctx)
	if err != nil {
		return err
	}
	from, to := now.Add(-*since), now.Add(-*slack)
	vigil, err := st.ShadowChanges(ctx, from.Add(-*slack), now)
	if err != nil {
		return err
	}
	cp, err := st.SystemAudits(ctx, from.Add(-*slack), now)
	if err != nil {
		return err
	}
	rep := monitor.CompareShadow(vigil, cp, from, to, *slack)
	if *format == "json" {
		a, ov, om := rep.Totals()
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{
			"from": rep.From.UTC(), "to": rep.To.UTC(), "slack_seconds": rep.Slack.Seconds(),
			"kinds": rep.Kinds, "silent": rep.Silent,
			"agreed": a, "only_vigil": ov, "only_monitor": om,
		})
	}
	return rep.Write(stdout)
}
