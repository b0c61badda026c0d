//go:build !chaos_noidentity

package store

// compareIdentity is false only in the chaos harness's broken build
// (identity_chaos_noidentity.go).
const compareIdentity = true
