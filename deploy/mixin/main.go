// Command mixin renders vigil's monitoring (the Prometheus rules, the
// Grafana dashboard and alerting, the operator's PrometheusRule) for one
// config: the selector of vigil's series and the label that tells vigil
// clusters apart. The sources are the files beside it; README.md says how.
//
//	cd deploy && go run ./mixin                    # re-render the committed files
//	go run ./mixin -check                          # fail if they are out of date
//	go run ./mixin -selector 'job="vigil-prod"' -cluster-label k8s_cluster -out /tmp/vigil
package main

//go:generate go run . -root ..

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mixin:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("mixin", flag.ContinueOnError)
	root := fs.String("root", ".", "the deploy/ directory, where the sources (mixin/) are")
	configPath := fs.String("config", "", "config file (default <root>/mixin/config.json)")
	selector := fs.String("selector", "", `label matchers of vigil's series, overriding the config's (e.g. job="vigil-prod",namespace="vigil")`)
	clusterLabel := fs.String("cluster-label", "", "label that tells vigil clusters apart, overriding the config's")
	out := fs.String("out", "", "directory to write the rendered files under (default <root>)")
	check := fs.Bool("check", false, "write nothing; fail if a rendered file differs from the one under -out")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *configPath == "" {
		*configPath = filepath.Join(*root, "mixin", "config.json")
	}
	if *out == "" {
		*out = *root
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return err
	}
	if *selector != "" {
		cfg.Selector = *selector
	}
	if *clusterLabel != "" {
		cfg.ClusterLabel = *clusterLabel
	}
	files, err := render(*root, cfg)
	if err != nil {
		return err
	}
	if *check {
		return checkFiles(*out, files)
	}
	return writeFiles(*out, files)
}

func writeFiles(dir string, files []file) error {
	for _, f := range files {
		path := filepath.Join(dir, f.path)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(path, f.data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// checkFiles fails if a file under dir is not what the sources render.
func checkFiles(dir string, files []file) error {
	var stale []string
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f.path))
		if err != nil || !bytes.Equal(b, f.data) {
			stale = append(stale, f.path)
		}
	}
	if len(stale) > 0 {
		return fmt.Errorf("out of date (edit deploy/mixin/, then run `go run ./mixin` in deploy/): %v", stale)
	}
	return nil
}
