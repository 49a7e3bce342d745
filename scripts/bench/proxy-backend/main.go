// A trivial proxy backend for the proxy benchmarks (scripts/bench/proxy.sh):
// answers fanfare's HTTP proxy calls at once, in Centrifugo's JSON shape, so
// the node's cost per proxied call is what a run measures.
//
//	POST /centrifugo/connect  -> {"result":{"user":"bench-<client id>"}}
//	POST /centrifugo/<other>  -> {"result":{}}   (publish: the client's data unchanged)
//	GET  /count               -> calls answered so far
//
// Usage: proxy-backend 127.0.0.1:PORT
package main

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
)

var calls atomic.Int64

var empty = []byte(`{"result":{}}`)

// clientID returns the value of the first "client" field of a JSON body
// without decoding it all (fanfare sends `"client":"<uuid>"`).
func clientID(body []byte) []byte {
	key := []byte(`"client":"`)
	i := bytes.Index(body, key)
	if i < 0 {
		return nil
	}
	rest := body[i+len(key):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return nil
	}
	return rest[:j]
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: proxy-backend 127.0.0.1:PORT")
		os.Exit(2)
	}
	http.HandleFunc("/count", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, strconv.FormatInt(calls.Load(), 10))
	})
	http.HandleFunc("/centrifugo/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/centrifugo/connect" {
			out := make([]byte, 0, 96)
			out = append(out, `{"result":{"user":"bench-`...)
			out = append(out, clientID(body)...)
			out = append(out, `"}}`...)
			w.Write(out)
			return
		}
		w.Write(empty)
	})
	log.Fatal(http.ListenAndServe(os.Args[1], nil))
}
