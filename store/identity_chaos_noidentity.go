//go:build chaos_noidentity

package store

// This file exists only for the chaos harness (chaos/, `make chaos`,
// chaos.TestFailoverBrokenBuildIsCaught): built with -tags
// chaos_noidentity, a fenced transaction no longer notices that the
// database is not the one its fence was raised on, so the harness can show
// that its failover nemesis catches a replica writing on a promoted standby
// that lost its successor's raise. Never build vigil with this tag for
// anything else.

const compareIdentity = false
