package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/station/watch"
)

// watch --dir needs nothing but the broker's address: the station's CA
// certificates verify the broker and a fleet-reader certificate is issued
// for the run, through the serving station's admin socket.
func TestWatchDir(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	st.Admin() // the socket answers: watch goes through it
	br := mqtttest.Start(t, st, mqtttest.Options{})

	dev := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + br.Addr).SetClientID("gw-1").SetTLSConfig(br.ClientTLS(t, "gw-1")))
	if tok := dev.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("device connect: %v", tok.Error())
	}
	defer dev.Disconnect(100)
	publish := func(topic string, retained bool, payload string) {
		t.Helper()
		if tok := dev.Publish(topic, 1, retained, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", topic, tok.Error())
		}
	}
	// Retained: delivered to the watcher when it subscribes.
	publish("devices/gw-1/status", true, "online")

	report := filepath.Join(t.TempDir(), "report.json")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out bytes.Buffer
	var errb testsync.Buffer
	done := make(chan int, 1)
	go func() {
		done <- runWith(ctx, &env{stdout: &out, stderr: &errb}, []string{"watch", "--dir", st.Dir, "--broker", br.URL, "--json", report})
	}()
	deadline := time.After(20 * time.Second)
	for !strings.Contains(errb.String(), "msg=watching") {
		select {
		case code := <-done:
			t.Fatalf("watch exited %d before subscribing: %s", code, errb.String())
		case <-deadline:
			cancel()
			<-done
			t.Fatalf("watch did not subscribe: %s\nbroker: %s", errb.String(), br.LogTail())
		case <-time.After(20 * time.Millisecond):
		}
	}
	for seq := 1; seq <= 3; seq++ {
		publish("devices/gw-1/telemetry", false, fmt.Sprintf(`[{"n":"t","v":%d,"seq":%d}]`, seq, seq))
	}
	// The broker has the records; give it a moment to pass them on.
	time.Sleep(time.Second)
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("watch = %d: %s", code, errb.String())
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	var devs []watch.Device
	if err := json.Unmarshal(b, &devs); err != nil {
		t.Fatalf("report %q: %v", b, err)
	}
	if len(devs) != 1 || devs[0].ID != "gw-1" || devs[0].Status != "online" || devs[0].Records != 3 || devs[0].Unique != 3 || devs[0].Missing != 0 {
		t.Errorf("report = %+v, want gw-1 online with records 1-3", devs)
	}
	if !strings.Contains(out.String(), "gw-1") {
		t.Errorf("watch printed %q, want a line for gw-1", out.String())
	}
	// The certificate watch used came from the station, audited.
	audit, err := os.ReadFile(filepath.Join(st.Dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(audit), `"event":"issue-service","result":"accepted","device":"fleet-reader"`) {
		t.Errorf("audit log has no fleet-reader certificate:\n%s", audit)
	}
}
