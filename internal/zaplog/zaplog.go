// Package zaplog sends a zap logger's entries to an hclog logger: the etcd
// client logs through zap, vigil through hclog, and an operator wants one
// stream in one format.
//
// The etcd client is chatty about things vigil handles itself (it retries,
// fails over between endpoints and re-grants leases), so levels move down one
// step: its Info is vigil's Debug, its Debug is Trace. Warnings (keep-alive
// failures, endpoint switches) and errors stay what they are.
package zaplog

import (
	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New is a zap logger writing to log.
func New(log hclog.Logger) *zap.Logger {
	return zap.New(&core{log: log})
}

type core struct {
	log    hclog.Logger
	fields []any // accumulated With fields, as hclog key/value pairs
}

func level(l zapcore.Level) hclog.Level {
	switch {
	case l < zapcore.InfoLevel:
		return hclog.Trace
	case l == zapcore.InfoLevel:
		return hclog.Debug
	case l == zapcore.WarnLevel:
		return hclog.Warn
	default:
		return hclog.Error
	}
}

func (c *core) Enabled(l zapcore.Level) bool {
	switch level(l) {
	case hclog.Trace:
		return c.log.IsTrace()
	case hclog.Debug:
		return c.log.IsDebug()
	case hclog.Warn:
		return c.log.IsWarn()
	default:
		return c.log.IsError()
	}
}

func (c *core) With(fs []zapcore.Field) zapcore.Core {
	return &core{log: c.log, fields: append(append([]any(nil), c.fields...), pairs(fs)...)}
}

func (c *core) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *core) Write(e zapcore.Entry, fs []zapcore.Field) error {
	args := append(append([]any(nil), c.fields...), pairs(fs)...)
	c.log.Log(level(e.Level), e.Message, args...)
	return nil
}

func (c *core) Sync() error { return nil }

// pairs turns zap fields into hclog's alternating keys and values, through
// zap's own encoder so every field type keeps its value.
func pairs(fs []zapcore.Field) []any {
	if len(fs) == 0 {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fs {
		f.AddTo(enc)
	}
	out := make([]any, 0, 2*len(fs))
	for _, f := range fs {
		if v, ok := enc.Fields[f.Key]; ok {
			out = append(out, f.Key, v)
		}
	}
	return out
}
