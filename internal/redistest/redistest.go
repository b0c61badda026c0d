// Package redistest names the Redis the tests use: VIGIL_TEST_REDIS_ADDR
// (default 127.0.0.1:6379), started by scripts/ensure-redis.sh when nothing
// answers there. Each test keeps to its own stream key.
package redistest

import "os"

// DefaultAddr is where the tests look for Redis when VIGIL_TEST_REDIS_ADDR
// is unset.
const DefaultAddr = "127.0.0.1:6379"

// Addr is the tests' Redis as host:port.
func Addr() string {
	if a := os.Getenv("VIGIL_TEST_REDIS_ADDR"); a != "" {
		return a
	}
	return DefaultAddr
}

// URL is the tests' Redis as a redis:// URL (database 0).
func URL() string { return "redis://" + Addr() + "/0" }
