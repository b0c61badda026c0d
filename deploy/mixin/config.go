package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// Config says where vigil's series are in a Prometheus and how its clusters
// are told apart. The committed files are rendered from config.json.
type Config struct {
	// Selector holds the label matchers, without braces, that pick the series
	// of vigil's replicas out of everything a Prometheus scrapes:
	// `job="vigil"`, or `job="vigil",namespace="vigil-prod"`.
	Selector string `json:"selector"`
	// ClusterLabel is the label whose value differs between vigil clusters
	// (staging, production) that one Prometheus, Thanos or Mimir sees.
	// Every rule and panel keeps it, so no number mixes two clusters.
	ClusterLabel string `json:"clusterLabel"`
}

// loadConfig reads a JSON config file; unknown fields are an error, so a
// misspelt setting is not silently left at its default.
func loadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, err
	}
	var c Config
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

var labelNameRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)

// matchers parses the selector and checks the cluster label.
func (c Config) matchers() ([]*labels.Matcher, error) {
	if !labelNameRE.MatchString(c.ClusterLabel) {
		return nil, fmt.Errorf("cluster label %q is not a label name", c.ClusterLabel)
	}
	sel := strings.TrimSpace(c.Selector)
	if sel == "" {
		return nil, fmt.Errorf("empty selector: vigil's series must be told apart from the rest")
	}
	ms, err := parser.NewParser(parser.Options{}).ParseMetricSelector("{" + sel + "}")
	if err != nil {
		return nil, fmt.Errorf("selector %q: %w", sel, err)
	}
	for _, m := range ms {
		switch {
		case m.Name == labels.MetricName:
			return nil, fmt.Errorf("selector %q: names a metric; it must pick targets, not series", sel)
		case m.Name == c.ClusterLabel:
			// The cluster label separates clusters; selecting on it would
			// hide all but some of them.
			return nil, fmt.Errorf("selector %q: matches the cluster label %q", sel, c.ClusterLabel)
		}
	}
	return ms, nil
}

// String is how the rendered files name the config in their headers.
func (c Config) String() string {
	return fmt.Sprintf("selector {%s}, cluster label %s", c.Selector, strconv.Quote(c.ClusterLabel))
}
