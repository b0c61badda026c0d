//go:build !unix

package main

import "github.com/hashicorp/go-hclog"

func checkOpenFiles(replicaConfig, hclog.Logger) {}
