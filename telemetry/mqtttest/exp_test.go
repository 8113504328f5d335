package mqtttest_test

import (
	"crypto/tls"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/mqtttest"
)

func dialConnect(t *testing.T, b *mqtttest.Broker, cfg *tls.Config) (*tls.Conn, error) {
	c, err := tls.Dial("tcp", b.Addr, cfg)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if err := mqtttest.MQTTConnect(c); err != nil {
		c.Close()
		return c, err
	}
	c.Close()
	return c, nil
}

func TestExpCRL(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	id, cert := enrollDevice(t, st)
	b := mqtttest.Start(t, st, mqtttest.Options{})
	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		cfg := b.ClientTLS(t, "x")
		cfg.Certificates = []tls.Certificate{cert}
		cfg.MaxVersion = v
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(0)
		for i := range 3 {
			c, err := dialConnect(t, b, cfg)
			t.Logf("v %x conn %d: %v resumed=%v", v, i, err, c.ConnectionState().DidResume)
		}
	}
	// keep one
	cfg := b.ClientTLS(t, "x")
	cfg.Certificates = []tls.Certificate{cert}
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(0)
	c, err := dialConnect(t, b, cfg)
	t.Logf("ticket conn: %v resumed=%v", err, c.ConnectionState().DidResume)

	keep, err := tls.Dial("tcp", b.Addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()
	keep.Write([]byte{0x10, 12, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, 0})
	var ack [4]byte
	keep.SetDeadline(time.Now().Add(3 * time.Second))
	_, err = keep.Read(ack[:])
	t.Logf("keep connack % x %v resumed=%v", ack, err, keep.ConnectionState().DidResume)

	if err := st.Revoke(id); err != nil {
		t.Fatal(err)
	}
	b.ReloadCRL()
	nocache := b.ClientTLS(t, "x")
	nocache.Certificates = []tls.Certificate{cert}
	_, err = dialConnect(t, b, nocache)
	t.Logf("after SIGHUP, full handshake: %v", err)
	keep.SetDeadline(time.Now().Add(500 * time.Millisecond))
	keep.Write([]byte{0xc0, 0}) // PINGREQ
	n, err := keep.Read(ack[:])
	t.Logf("keep after SIGHUP: % x %v", ack[:n], err)
	c, err = dialConnect(t, b, cfg)
	t.Logf("after SIGHUP, with ticket: %v resumed=%v", err, c != nil && c.ConnectionState().DidResume)
	b.Restart()
	c, err = dialConnect(t, b, cfg)
	t.Logf("after Restart with ticket: %v resumed=%v", err, c != nil && c.ConnectionState().DidResume)
	t.Log(b.LogTail())
}
