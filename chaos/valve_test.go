package chaos

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// echoServer answers every line with the line.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestValveHoldsOneDirection(t *testing.T) {
	v, err := newValve(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	c, err := net.Dial("tcp", v.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	roundTrip := func(msg string, within time.Duration) (string, error) {
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(within))
		return r.ReadString('\n')
	}
	if got, err := roundTrip("one", 2*time.Second); err != nil || got != "one\n" {
		t.Fatalf("forwarding: %q %v", got, err)
	}
	for _, d := range []direction{downstream, upstream} {
		v.Hold(d)
		if got, err := roundTrip("held "+d.String(), 200*time.Millisecond); err == nil {
			t.Fatalf("%s held, yet the echo came back: %q", d, got)
		}
		v.Release()
		// What was held is delivered, not lost.
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		got, err := r.ReadString('\n')
		if err != nil || !strings.HasPrefix(got, "held "+d.String()) {
			t.Fatalf("after releasing %s: %q %v", d, got, err)
		}
	}
}

func TestReadReply(t *testing.T) {
	in := "*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$8\r\nvigil_id\r\n$1\r\nx\r\n$7\r\npayload\r\n$62\r\n{\"event\":\"host.down\",\"resource\":{\"id\":\"host-1\",\"type\":\"host\"}}\r\n" +
		"*2\r\n$3\r\n2-0\r\n*0\r\n"
	v, err := readReply(bufio.NewReader(strings.NewReader(in)))
	if err != nil {
		t.Fatal(err)
	}
	items := v.([]any)
	se, ok := parseStreamEntry(items[0])
	if !ok || se.ID != "1-0" || se.VigilID != "x" || se.Event != "host.down" || se.Resource != "host-1" || se.Type != "host" {
		t.Errorf("got %+v %v", se, ok)
	}
	if _, err := readReply(bufio.NewReader(strings.NewReader("-ERR nope\r\n"))); err == nil {
		t.Error("an error reply is an error")
	}
}
