// End-to-end tests of fanfare with the real centrifuge-go SDK (v0.12.1), both
// NewProtobufClient and NewJsonClient, against the binary named by FANFARE_BIN
// (started here on free loopback ports). Run with tests/go/run.sh.
package sdktest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge-go"
)

const wait = 10 * time.Second

var wsURL string

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestMain starts one fanfare process for all tests and stops it at the end.
func TestMain(m *testing.M) {
	bin := os.Getenv("FANFARE_BIN")
	if bin == "" || !filepath.IsAbs(bin) {
		fmt.Fprintln(os.Stderr, "FANFARE_BIN must be the absolute path of the fanfare binary")
		os.Exit(2)
	}
	dir, err := os.MkdirTemp("", "fanfare-go-sdk-")
	if err != nil {
		panic(err)
	}
	// A port picked free can be taken before the node binds it: retry on
	// new ports when the node exits.
	stop := func() {}
	var logPath string
	healthy := false
	for attempt := 0; attempt < 3 && !healthy; attempt++ {
		var httpPort int
		stop, httpPort, logPath, healthy = startNode(bin, dir, attempt)
		if healthy {
			wsURL = fmt.Sprintf("ws://127.0.0.1:%d/connection/websocket", httpPort)
		}
	}
	code := 2
	if healthy {
		code = m.Run()
	} else {
		fmt.Fprintln(os.Stderr, "fanfare did not become healthy")
	}
	stop()
	if code != 0 {
		log, _ := os.ReadFile(logPath)
		fmt.Fprintf(os.Stderr, "---- fanfare log ----\n%s\n----\n", log)
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// startNode starts fanfare on free ports with the tests' config and waits up
// to 15 s until it is ready: it logged that it holds both ports (a /health
// answer alone may come from another suite's node that took the port first)
// and /health answers 200. false when it exited or did not get ready. stop
// SIGKILLs it (by PID) and waits until it is gone.
func startNode(bin, dir string, attempt int) (stop func(), httpPort int, logPath string, ok bool) {
	httpPort, grpcPort := freePort(), freePort()
	config := fmt.Sprintf(`[http]
listen = "127.0.0.1:%d"

[grpc]
listen = "127.0.0.1:%d"

# Short pings, so the SDK's pongs are exercised (TestPingsAreAnswered). The
# pong timeout is just under the interval (the node wants it shorter):
# every client of every test must pong within it, and a test process stalled
# on a loaded machine must not turn into a 3012 close and a reconnect.
[client]
ping_interval = "2s"
pong_timeout = "1900ms"

[[namespaces]]
name = ""
allow_publish = true
allow_subscribe = true
history_size = 100
history_ttl = "300s"
presence = true

# Fossil delta compression (TestDeltaSubscription...).
[[namespaces]]
name = "doc"
allow_publish = true
history_size = 200
history_ttl = "300s"
allowed_delta_types = ["fossil"]
`, httpPort, grpcPort)
	configPath := filepath.Join(dir, fmt.Sprintf("config-%d.toml", attempt))
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		panic(err)
	}
	logPath = filepath.Join(dir, fmt.Sprintf("fanfare-%d.log", attempt))
	logFile, err := os.Create(logPath)
	if err != nil {
		panic(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "--config", configPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Stopped with SIGTERM and expected gone at once: no drain delay or period.
	cmd.Env = append(os.Environ(), "FANFARE__SHUTDOWN__DRAIN_DELAY=0s", "FANFARE__SHUTDOWN__DRAIN_PERIOD=0s")
	if err := cmd.Start(); err != nil {
		panic(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop = func() { _ = cmd.Process.Kill(); <-exited }
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		select {
		case <-exited:
			log, _ := os.ReadFile(logPath)
			fmt.Fprintf(os.Stderr, "fanfare exited before it was ready:\n%s\n", log)
			return stop, httpPort, logPath, false
		default:
		}
		if log, _ := os.ReadFile(logPath); !bytes.Contains(log, []byte("control API listening")) {
			continue
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", httpPort))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return stop, httpPort, logPath, true
			}
		}
	}
	stop()
	return stop, httpPort, logPath, false
}

// events collects what a client and its subscriptions report.
type events struct {
	mu           sync.Mutex
	pubs         []centrifuge.Publication
	disconnected chan centrifuge.DisconnectedEvent
	// Connecting events after the first connect: reconnects.
	reconnecting chan centrifuge.ConnectingEvent
	subscribed   chan centrifuge.SubscribedEvent
	changed      chan struct{}
}

func newEvents() *events {
	return &events{
		disconnected: make(chan centrifuge.DisconnectedEvent, 16),
		reconnecting: make(chan centrifuge.ConnectingEvent, 16),
		subscribed:   make(chan centrifuge.SubscribedEvent, 16),
		changed:      make(chan struct{}, 1024),
	}
}

// waitPubs waits until n publications arrived and returns them.
func (e *events) waitPubs(t *testing.T, n int, what string) []centrifuge.Publication {
	t.Helper()
	deadline := time.After(wait)
	for {
		e.mu.Lock()
		if len(e.pubs) >= n {
			out := append([]centrifuge.Publication(nil), e.pubs...)
			e.mu.Unlock()
			return out
		}
		have := len(e.pubs)
		e.mu.Unlock()
		select {
		case <-e.changed:
		case <-deadline:
			t.Fatalf("timed out waiting for %s: have %d of %d publications", what, have, n)
		}
	}
}

type kind int

const (
	protobuf kind = iota
	jsonKind
)

// countingConn counts the bytes read from the server.
type countingConn struct {
	net.Conn
	read *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// client makes a connected client of the given kind.
func client(t *testing.T, k kind) (*centrifuge.Client, *events) {
	t.Helper()
	return clientCounting(t, k, nil)
}

// clientCounting is client whose bytes read from the server (over all its
// connections) are added to read, when given.
func clientCounting(t *testing.T, k kind, read *atomic.Int64) (*centrifuge.Client, *events) {
	t.Helper()
	cfg := centrifuge.Config{MinReconnectDelay: 50 * time.Millisecond, MaxReconnectDelay: 300 * time.Millisecond}
	if read != nil {
		cfg.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return countingConn{conn, read}, nil
		}
	}
	var c *centrifuge.Client
	if k == protobuf {
		c = centrifuge.NewProtobufClient(wsURL, cfg)
	} else {
		c = centrifuge.NewJsonClient(wsURL, cfg)
	}
	e := newEvents()
	connected := make(chan struct{}, 16)
	c.OnConnected(func(centrifuge.ConnectedEvent) { connected <- struct{}{} })
	c.OnConnecting(func(ev centrifuge.ConnectingEvent) {
		if ev.Code != 0 { // 0: the connect call itself
			e.reconnecting <- ev
		}
	})
	c.OnDisconnected(func(ev centrifuge.DisconnectedEvent) { e.disconnected <- ev })
	c.OnError(func(ev centrifuge.ErrorEvent) { t.Logf("client error: %v", ev.Error) })
	t.Cleanup(c.Close)
	if err := c.Connect(); err != nil {
		t.Fatalf("connect: %v", err)
	}
	select {
	case <-connected:
	case <-time.After(wait):
		t.Fatal("timed out waiting for connected")
	}
	return c, e
}

// subscribe subscribes c to channel (recoverable) and waits for subscribed.
func subscribe(t *testing.T, c *centrifuge.Client, e *events, channel string) *centrifuge.Subscription {
	t.Helper()
	return subscribeWith(t, c, e, channel, centrifuge.SubscriptionConfig{Recoverable: true, Positioned: true})
}

// subscribeWith subscribes c to channel with cfg and waits for subscribed.
func subscribeWith(t *testing.T, c *centrifuge.Client, e *events, channel string, cfg centrifuge.SubscriptionConfig) *centrifuge.Subscription {
	t.Helper()
	sub, err := c.NewSubscription(channel, cfg)
	if err != nil {
		t.Fatal(err)
	}
	sub.OnPublication(func(ev centrifuge.PublicationEvent) {
		e.mu.Lock()
		e.pubs = append(e.pubs, ev.Publication)
		e.mu.Unlock()
		e.changed <- struct{}{}
	})
	sub.OnSubscribed(func(ev centrifuge.SubscribedEvent) { e.subscribed <- ev })
	sub.OnError(func(ev centrifuge.SubscriptionErrorEvent) { t.Logf("subscription error: %v", ev.Error) })
	if err := sub.Subscribe(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.subscribed:
	case <-time.After(wait):
		t.Fatalf("timed out subscribing to %s", channel)
	}
	return sub
}

func publish(t *testing.T, c *centrifuge.Client, channel string, data []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := c.Publish(ctx, channel, data); err != nil {
		t.Fatalf("publish %q: %v", data, err)
	}
}

func TestProtobufClientPublishesBytesAndReadsPresenceHistoryAndRecovery(t *testing.T) {
	pub, _ := client(t, protobuf)
	subClient, e := client(t, protobuf)
	sub := subscribe(t, subClient, e, "go-pb")

	binary := []byte{0, 0xff, '\n', 0xc3, 0x28}
	publish(t, pub, "go-pb", binary)
	publish(t, pub, "go-pb", []byte(`{"n":2}`))
	pubs := e.waitPubs(t, 2, "two publications")
	if !bytes.Equal(pubs[0].Data, binary) || string(pubs[1].Data) != `{"n":2}` {
		t.Fatalf("data: %q %q", pubs[0].Data, pubs[1].Data)
	}
	if pubs[0].Offset != 1 || pubs[1].Offset != 2 || pubs[0].Info == nil {
		t.Fatalf("offsets or info: %+v", pubs)
	}

	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	presence, err := sub.Presence(ctx)
	if err != nil || len(presence.Clients) != 1 {
		t.Fatalf("presence: %+v %v", presence, err)
	}
	stats, err := sub.PresenceStats(ctx)
	if err != nil || stats.NumClients != 1 {
		t.Fatalf("presence stats: %+v %v", stats, err)
	}
	history, err := sub.History(ctx, centrifuge.WithHistoryLimit(-1))
	if err != nil || len(history.Publications) != 2 || !bytes.Equal(history.Publications[0].Data, binary) {
		t.Fatalf("history: %+v %v", history, err)
	}

	// Missed while disconnected, recovered on reconnect.
	if err := subClient.Disconnect(); err != nil {
		t.Fatal(err)
	}
	<-e.disconnected
	publish(t, pub, "go-pb", []byte{3, 0xfe})
	publish(t, pub, "go-pb", []byte{4, 0xfe})
	if err := subClient.Connect(); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-e.subscribed:
		if !ev.WasRecovering || !ev.Recovered {
			t.Fatalf("resubscribe did not recover: %+v", ev)
		}
	case <-time.After(wait):
		t.Fatal("timed out waiting for the resubscribe")
	}
	pubs = e.waitPubs(t, 4, "the recovered publications")
	if !bytes.Equal(pubs[2].Data, []byte{3, 0xfe}) || !bytes.Equal(pubs[3].Data, []byte{4, 0xfe}) || pubs[3].Offset != 4 {
		t.Fatalf("recovered: %+v", pubs[2:])
	}
}

func TestJsonClientPublishesAndReceivesJSON(t *testing.T) {
	pub, _ := client(t, jsonKind)
	subClient, e := client(t, jsonKind)
	subscribe(t, subClient, e, "go-json")
	publish(t, pub, "go-json", []byte(`{"text": "hi"}`))
	pubs := e.waitPubs(t, 1, "the publication")
	if string(pubs[0].Data) != `{"text":"hi"}` {
		t.Fatalf("data: %s", pubs[0].Data)
	}
}

func TestJsonAndProtobufSubscribersShareAChannel(t *testing.T) {
	pbSubClient, pbEvents := client(t, protobuf)
	jsonSubClient, jsonEvents := client(t, jsonKind)
	subscribe(t, pbSubClient, pbEvents, "go-mixed")
	subscribe(t, jsonSubClient, jsonEvents, "go-mixed")
	pbPub, _ := client(t, protobuf)
	jsonPub, _ := client(t, jsonKind)

	publish(t, jsonPub, "go-mixed", []byte(`{"from":"json"}`))
	publish(t, pbPub, "go-mixed", []byte(`{"from":"protobuf"}`))
	for name, e := range map[string]*events{"protobuf": pbEvents, "json": jsonEvents} {
		pubs := e.waitPubs(t, 2, name+" subscriber")
		var got []map[string]string
		for _, p := range pubs {
			var v map[string]string
			if err := json.Unmarshal(p.Data, &v); err != nil {
				t.Fatalf("%s subscriber got %q: %v", name, p.Data, err)
			}
			got = append(got, v)
		}
		if got[0]["from"] != "json" || got[1]["from"] != "protobuf" {
			t.Fatalf("%s subscriber got %v", name, got)
		}
	}

	// Binary data: the Protobuf subscriber gets the bytes, the JSON client is
	// disconnected with 3506 (inappropriate protocol), as Centrifugo does.
	binary := []byte{0xde, 0xad, 0xbe, 0xef, 0}
	publish(t, pbPub, "go-mixed", binary)
	if pubs := pbEvents.waitPubs(t, 3, "the binary publication"); !bytes.Equal(pubs[2].Data, binary) {
		t.Fatalf("binary data: %q", pubs[2].Data)
	}
	select {
	case ev := <-jsonEvents.disconnected:
		if ev.Code != 3506 || !strings.Contains(ev.Reason, "inappropriate protocol") {
			t.Fatalf("JSON client disconnected with %+v", ev)
		}
	case <-time.After(wait):
		t.Fatal("the JSON subscriber was not disconnected")
	}
	jsonEvents.mu.Lock()
	n := len(jsonEvents.pubs)
	jsonEvents.mu.Unlock()
	if n != 2 {
		t.Fatalf("the JSON subscriber got %d publications, want 2", n)
	}
}

func TestPingsAreAnsweredByBothClients(t *testing.T) {
	_, pbEvents := client(t, protobuf)
	_, jsonEvents := client(t, jsonKind)
	// Pings 1-2 s after connecting and every 2 s after that: at least two in
	// 6.5 s. An unanswered one closes the connection with 3012 1.9 s after it
	// (the first by 4.4 s at the latest: each deadline fires up to one timer
	// tick, 1/8 of the pong timeout, late), and the SDK reconnects. The SDK
	// shows no pings, so this is slept for.
	time.Sleep(6500 * time.Millisecond)
	for name, e := range map[string]*events{"protobuf": pbEvents, "json": jsonEvents} {
		select {
		case ev := <-e.disconnected:
			t.Fatalf("%s client disconnected: %+v", name, ev)
		case ev := <-e.reconnecting:
			t.Fatalf("%s client reconnecting: %+v", name, ev)
		default:
		}
	}
}

// document is version v of a ~2 KB JSON document: one of its 40 fields and
// the version change per publication.
func document(v int) []byte {
	var b strings.Builder
	b.WriteString("{")
	for i := 0; i < 40; i++ {
		touched := 0
		if i == v%40 {
			touched = v
		}
		fmt.Fprintf(&b, `"field%02d":"value of field %d, last touched by version %d",`, i, i, touched)
	}
	fmt.Fprintf(&b, `"version":%d}`, v)
	return []byte(b.String())
}

// A subscription with Delta: DeltaTypeFossil hands the app exactly the bytes a
// subscription without it gets, over 100 publications with a recovery after
// 50, in both protocols (the SDK panics on a delta it cannot apply).
func TestDeltaSubscriptionGetsTheSameBytesAsAPlainOneAcrossARecovery(t *testing.T) {
	for _, k := range []kind{jsonKind, protobuf} {
		name := map[kind]string{jsonKind: "json", protobuf: "protobuf"}[k]
		t.Run(name, func(t *testing.T) {
			channel := "doc:go-" + name
			pub, _ := client(t, jsonKind)
			var plainBytes, deltaBytes atomic.Int64
			plainClient, plainEvents := clientCounting(t, k, &plainBytes)
			deltaClient, deltaEvents := clientCounting(t, k, &deltaBytes)
			subscribeWith(t, plainClient, plainEvents, channel, centrifuge.SubscriptionConfig{Recoverable: true})
			subscribeWith(t, deltaClient, deltaEvents, channel,
				centrifuge.SubscriptionConfig{Recoverable: true, Delta: centrifuge.DeltaTypeFossil})
			for v := 1; v <= 50; v++ {
				publish(t, pub, channel, document(v))
			}
			plainEvents.waitPubs(t, 50, "plain: 1..50")
			deltaEvents.waitPubs(t, 50, "delta: 1..50")
			for _, c := range []struct {
				c *centrifuge.Client
				e *events
			}{{plainClient, plainEvents}, {deltaClient, deltaEvents}} {
				if err := c.c.Disconnect(); err != nil {
					t.Fatal(err)
				}
				select {
				case <-c.e.disconnected:
				case <-time.After(wait):
					t.Fatal("timed out waiting for disconnected")
				}
			}
			for v := 51; v <= 60; v++ {
				publish(t, pub, channel, document(v))
			}
			for _, c := range []struct {
				c *centrifuge.Client
				e *events
			}{{plainClient, plainEvents}, {deltaClient, deltaEvents}} {
				if err := c.c.Connect(); err != nil {
					t.Fatal(err)
				}
				select {
				case ev := <-c.e.subscribed:
					if !ev.WasRecovering || !ev.Recovered {
						t.Fatalf("resubscribe did not recover: %+v", ev)
					}
				case <-time.After(wait):
					t.Fatal("timed out waiting for the resubscribe")
				}
			}
			for v := 61; v <= 100; v++ {
				publish(t, pub, channel, document(v))
			}
			plain := plainEvents.waitPubs(t, 100, "plain: all 100")
			delta := deltaEvents.waitPubs(t, 100, "delta: all 100")
			time.Sleep(200 * time.Millisecond)
			if len(plainEvents.pubs) != 100 || len(deltaEvents.pubs) != 100 {
				t.Fatalf("duplicates: %d and %d publications", len(plainEvents.pubs), len(deltaEvents.pubs))
			}
			for i := range plain {
				want := document(i + 1)
				if !bytes.Equal(plain[i].Data, want) {
					t.Fatalf("without delta, version %d: %s", i+1, plain[i].Data)
				}
				if !bytes.Equal(delta[i].Data, want) {
					t.Fatalf("with delta, version %d: %s", i+1, delta[i].Data)
				}
				if delta[i].Offset != plain[i].Offset {
					t.Fatalf("offsets differ at %d: %d vs %d", i, delta[i].Offset, plain[i].Offset)
				}
			}
			// Deltas were negotiated and applied: the same data for a fraction of the bytes.
			t.Logf("bytes read: %d without delta, %d with", plainBytes.Load(), deltaBytes.Load())
			if deltaBytes.Load()*5 >= plainBytes.Load() {
				t.Fatalf("%d bytes with delta, %d without", deltaBytes.Load(), plainBytes.Load())
			}
		})
	}
}
