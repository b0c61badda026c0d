//go:build unix

package main

import "syscall"

// openFilesLimit is the process's open-files limit (RLIMIT_NOFILE). The Go
// runtime has already raised the soft limit to the hard one at start.
func openFilesLimit() (uint64, bool) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, false
	}
	return lim.Cur, true
}
