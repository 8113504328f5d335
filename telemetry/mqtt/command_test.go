package mqtt_test

import (
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/station/mqtttest"
)

// The station's nudge on devices/ID/cmd reaches the uplink's Command
// callback, also after a reconnect (the clean session subscribes
// again); a malformed command and one for another device do not.
func TestCommandsReachTheAgent(t *testing.T) {
	ops := make(chan string, 16)
	r := newRig(t, rigOptions{
		broker:  mqtttest.Options{ACL: []string{"user fleet-commander", "topic write devices/+/cmd"}},
		command: func(op string) { ops <- op },
	})
	sub := r.br.Subscribe(t, "devices/+/telemetry")
	collect(t, sub, r.ingest(1, "up"), 10*time.Second)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + r.br.Addr).SetClientID("fleet-commander").
		SetTLSConfig(r.br.ClientTLS(t, "fleet-commander")).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("commander connect: %v", tok.Error())
	}
	defer c.Disconnect(100)
	publish := func(topic, payload string) {
		t.Helper()
		if tok := c.Publish(topic, 1, false, []byte(payload)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	publish("devices/"+r.id+"/cmd", `not json`)
	publish("devices/someone-else/cmd", `{"op":"for-another"}`)
	publish("devices/"+r.id+"/cmd", `{"op":"firmware-check"}`)
	select {
	case op := <-ops:
		if op != "firmware-check" {
			t.Fatalf("first command = %q, want firmware-check (the malformed one and the other device's are dropped)", op)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the command did not reach the agent")
	}
	// After a broker restart the uplink subscribes again.
	r.br.Restart()
	sub.WaitSubscribed(t, 2)
	collect(t, sub, r.ingest(1, "again"), 30*time.Second)
	c.Disconnect(0)
	c = paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + r.br.Addr).SetClientID("fleet-commander").
		SetTLSConfig(r.br.ClientTLS(t, "fleet-commander")).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("commander reconnect: %v", tok.Error())
	}
	publish("devices/"+r.id+"/cmd", `{"op":"firmware-check"}`)
	select {
	case op := <-ops:
		if op != "firmware-check" {
			t.Fatalf("command after the restart = %q", op)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no command after the broker restart: the uplink did not subscribe again")
	}
}
