// Command etcd is the etcd server at the version vigil's client is built
// against (the module's go.etcd.io/etcd/server/v3 requirement), so that
// `go tool etcd` works on a fresh checkout. It exists only to give the tool
// that name: a tool directive on go.etcd.io/etcd/server/v3 itself would be
// run as `go tool server`.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
