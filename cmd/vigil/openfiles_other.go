//go:build !unix

package main

func openFilesLimit() (uint64, bool) { return 0, false }
