package deploy

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// envName is a flag's environment twin, as internal/cli and cmd/agentsim
// define it: --lease-ttl is VIGIL_LEASE_TTL.
func envName(flag string) string {
	return "VIGIL_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// flagSet is one command's flags by name.
type flagSet map[string]bool

func (f flagSet) env() map[string]string {
	m := map[string]string{}
	for name := range f {
		m[envName(name)] = name
	}
	return m
}

func (f flagSet) sorted() []string {
	var s []string
	for n := range f {
		s = append(s, n)
	}
	sort.Strings(s)
	return s
}

var (
	commandFlagsOnce sync.Once
	commandFlagsVal  map[string]flagSet
	commandFlagsErr  error
)

// commandFlags reads the flags of vigil's commands from its source, so the
// deployment files are checked against the flags that really exist rather than
// a copy that can drift: "vigil run", "vigil migrate", ... and "agentsim".
// A command's flags are the flag registrations (fs.StringVar(&x, "name", ...),
// fs.Duration("name", ...), ...) in its function and in every function of the
// package it reaches.
func commandFlags(t *testing.T) map[string]flagSet {
	t.Helper()
	commandFlagsOnce.Do(func() {
		commandFlagsVal = map[string]flagSet{}
		vigil, err := parsePackage(filepath.Join(repoRoot, "cmd", "vigil"))
		if err != nil {
			commandFlagsErr = err
			return
		}
		for sub, fn := range vigil.subcommands() {
			commandFlagsVal["vigil "+sub] = vigil.reachableFlags(fn)
		}
		agentsim, err := parsePackage(filepath.Join(repoRoot, "cmd", "agentsim"))
		if err != nil {
			commandFlagsErr = err
			return
		}
		commandFlagsVal["agentsim"] = agentsim.reachableFlags("parseFlags")
	})
	if commandFlagsErr != nil {
		t.Fatalf("reading vigil's flags from source: %v", commandFlagsErr)
	}
	return commandFlagsVal
}

// flagsOf returns the flags of the command a container runs ("vigil run",
// "agentsim", ...), or nil when it is not one of vigil's binaries.
func flagsOf(t *testing.T, command []string) (string, flagSet) {
	t.Helper()
	if len(command) == 0 {
		return "", nil
	}
	bin := filepath.Base(command[0])
	switch bin {
	case "agentsim":
		return bin, commandFlags(t)[bin]
	case "vigil":
		if len(command) < 2 {
			t.Fatalf("command %q names no vigil subcommand", command)
		}
		name := "vigil " + command[1]
		fs, ok := commandFlags(t)[name]
		if !ok {
			t.Fatalf("command %q: vigil has no subcommand %q", command, command[1])
		}
		return name, fs
	}
	return "", nil
}

// checkCommandArgs checks that every --flag in a container command exists.
func checkCommandArgs(t *testing.T, where string, command []string) {
	t.Helper()
	name, fs := flagsOf(t, command)
	if fs == nil {
		return
	}
	for _, arg := range command[1:] {
		if !strings.HasPrefix(arg, "-") {
			continue
		}
		flag := strings.TrimLeft(arg, "-")
		flag, _, _ = strings.Cut(flag, "=")
		if !fs[flag] {
			t.Errorf("%s: %s has no flag --%s (flags: %v)", where, name, flag, fs.sorted())
		}
	}
}

type goPackage struct {
	funcs map[string][]*ast.FuncDecl // by name; methods of several types may share one
}

func parsePackage(dir string) (*goPackage, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	p := &goPackage{funcs: map[string][]*ast.FuncDecl{}}
	fset := token.NewFileSet()
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, filepath.Join(dir, e.Name()), nil, parser.SkipObjectResolution)
		if err != nil {
			return nil, err
		}
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				p.funcs[fd.Name.Name] = append(p.funcs[fd.Name.Name], fd)
			}
		}
	}
	return p, nil
}

// subcommands maps each subcommand to its function, from the composite
// literals {"run", "synopsis", runRun} in the package's command table.
func (p *goPackage) subcommands() map[string]string {
	subs := map[string]string{}
	for _, fds := range p.funcs {
		for _, fd := range fds {
			ast.Inspect(fd, func(n ast.Node) bool {
				cl, ok := n.(*ast.CompositeLit)
				if !ok || len(cl.Elts) != 3 {
					return true
				}
				lit, ok1 := cl.Elts[0].(*ast.BasicLit)
				fn, ok2 := cl.Elts[2].(*ast.Ident)
				if ok1 && ok2 && lit.Kind == token.STRING {
					if name, err := strconv.Unquote(lit.Value); err == nil && p.funcs[fn.Name] != nil {
						subs[name] = fn.Name
					}
				}
				return true
			})
		}
	}
	return subs
}

// flagMethods are the flag.FlagSet methods that define a flag, with the index
// of the name argument.
var flagMethods = map[string]int{
	"String": 0, "Bool": 0, "Int": 0, "Int64": 0, "Uint": 0, "Uint64": 0, "Float64": 0, "Duration": 0, "Func": 0, "BoolFunc": 0,
	"StringVar": 1, "BoolVar": 1, "IntVar": 1, "Int64Var": 1, "UintVar": 1, "Uint64Var": 1, "Float64Var": 1, "DurationVar": 1, "Var": 1, "TextVar": 1,
}

func (p *goPackage) reachableFlags(root string) flagSet {
	flags := flagSet{}
	seen := map[string]bool{}
	var visit func(name string)
	visit = func(name string) {
		if seen[name] {
			return
		}
		seen[name] = true
		for _, fd := range p.funcs[name] {
			ast.Inspect(fd, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				switch fun := call.Fun.(type) {
				case *ast.Ident:
					visit(fun.Name)
				case *ast.SelectorExpr:
					if i, ok := flagMethods[fun.Sel.Name]; ok && len(call.Args) >= i+2 {
						if lit, ok := call.Args[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
							if s, err := strconv.Unquote(lit.Value); err == nil {
								flags[s] = true
							}
						}
					}
					visit(fun.Sel.Name)
				}
				return true
			})
		}
	}
	visit(root)
	return flags
}

// TestFlagsFromSource guards the extraction the other tests rely on.
func TestFlagsFromSource(t *testing.T) {
	want := map[string][]string{
		"vigil run":     {"database-url", "etcd-endpoints", "cluster", "http-addr", "lease-ttl", "interval", "shards", "log-format"},
		"vigil migrate": {"database-url", "control-plane-tables"},
		"agentsim":      {"database-url", "hosts", "listen", "admin-addr", "seed"},
	}
	got := commandFlags(t)
	for cmd, flags := range want {
		fs, ok := got[cmd]
		if !ok {
			t.Errorf("no command %q found in vigil's source (found %d commands)", cmd, len(got))
			continue
		}
		for _, f := range flags {
			if !fs[f] {
				t.Errorf("%s: flag --%s not found; extracted %v", cmd, f, fs.sorted())
			}
		}
	}
	if got["vigil migrate"]["etcd-endpoints"] {
		t.Errorf("vigil migrate should not have run's flags: %v", got["vigil migrate"].sorted())
	}
}
