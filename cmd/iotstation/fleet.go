package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"iotagent.dev/iotagent/dtls/collector"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/demobroker"
	"iotagent.dev/iotagent/station/republish"
	"iotagent.dev/iotagent/station/watch"
	"iotagent.dev/iotagent/telemetry/senml"
)

// cmdDemoBroker runs the embedded MQTT broker (demo only).
func cmdDemoBroker(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags(e, "demo-broker")
	listen := fs.String("listen", "127.0.0.1:8883", "MQTT over TLS `ADDR`ess")
	readerFirst := fs.Bool("reader-first", false, "admit devices only once the fleet-reader has subscribed (the embedded broker keeps no sessions across restarts)")
	if _, err := parse(fs, dir, args, 0); err != nil {
		return err
	}
	a, err := station.OpenAdmin(*dir)
	if err != nil {
		return err
	}
	defer a.Close()
	host := *listen
	if h, _, err := splitHost(*listen); err == nil {
		host = h
	}
	sc, err := a.IssueService(ctx, station.ServiceRequest{Name: "demo-broker", SANs: []string{host, "localhost", "127.0.0.1"}, Server: true, Lifetime: 24 * time.Hour})
	if err != nil {
		return err
	}
	trust, err := a.TrustPEM(ctx)
	if err != nil {
		return err
	}
	cert, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(trust)
	log := slog.New(slog.NewTextHandler(e.stderr, nil))
	b, err := demobroker.New(demobroker.Config{Addr: *listen, Certificate: cert, ClientCAs: pool,
		Revoked: demobroker.CRLFile(filepath.Join(*dir, "crl.pem")), ReaderFirst: *readerFirst, Logger: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "demo broker (for the demo only) on mqtts://%s\n", *listen)
	if e.ready != nil {
		e.ready(*listen)
	}
	return b.Run(ctx)
}

// cmdWatch subscribes to every device's telemetry and reports delivery per
// device.
func cmdWatch(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "watch")
	broker := fs.String("broker", "", "broker `URL`, mqtts://HOST:PORT")
	certFile := fs.String("cert", "", "client certificate `FILE` (iotstation issue --name fleet-reader)")
	keyFile := fs.String("key", "", "its key `FILE`")
	caFile := fs.String("ca", "", "CA `FILE` that verifies the broker")
	dur := fs.Duration("for", 0, "stop after this long (default: until interrupted)")
	out := fs.String("json", "", "also write the per-device report to this `FILE` as JSON")
	persistent := fs.Bool("persistent", false, "keep a persistent session, so the broker queues what arrives while the watcher is away")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if *broker == "" || *certFile == "" || *keyFile == "" || *caFile == "" {
		return usagef("watch: --broker, --cert, --key and --ca are required")
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return usageError{fmt.Errorf("watch: %w", err)}
	}
	roots, err := station.ReadCertificates(*caFile)
	if err != nil {
		return usageError{fmt.Errorf("watch: --ca: %w", err)}
	}
	pool := x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	w, err := watch.New(watch.Config{Broker: *broker, Persistent: *persistent, TLS: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12},
		Logger: slog.New(slog.NewTextHandler(e.stderr, nil))})
	if err != nil {
		return usageError{err}
	}
	if *dur > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *dur)
		defer cancel()
	}
	w.Run(ctx)
	devs := w.Devices()
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tMESSAGES\tRECORDS\tUNIQUE\tDUPLICATES\tMISSING\tSEQ RANGE")
	for _, d := range devs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d-%d\n", d.ID, d.Messages, d.Records, d.Unique, d.Duplicates, d.Missing, d.MinSeq, d.MaxSeq)
	}
	tw.Flush()
	if *out != "" {
		b, _ := json.MarshalIndent(devs, "", "  ")
		return os.WriteFile(*out, append(b, '\n'), 0o644)
	}
	return nil
}

// newCollector builds the CoAP/DTLS collector of iotstation serve: a
// server certificate from the station's CA, device certificates checked
// against the registry (revocation is immediate), records to a JSON-lines
// file and, optionally, republished to MQTT.
func newCollector(s *station.Station, dir, listen, sinkPath, mqttURL, mqttCA, san string, log *slog.Logger) (*collector.Collector, func(), error) {
	sans := []string{"localhost", "127.0.0.1", "::1"}
	if san != "" {
		sans = append([]string{san}, sans...)
	} else if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		sans = append([]string{host}, sans...)
	}
	sc, err := s.IssueService("coap-collector", sans, true, 365*24*time.Hour)
	if err != nil {
		return nil, nil, err
	}
	cert, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.TrustPEM())
	if sinkPath == "" {
		sinkPath = filepath.Join(dir, "telemetry.jsonl")
	}
	file, err := collector.NewJSONLinesSink(sinkPath)
	if err != nil {
		return nil, nil, err
	}
	sinks := []collector.Sink{file}
	closers := []func() error{file.Close}
	if mqttURL != "" {
		client, err := s.IssueService("coap-collector", nil, false, 365*24*time.Hour)
		if err != nil {
			return nil, nil, err
		}
		kp, err := tls.X509KeyPair(client.Chain, client.Key)
		if err != nil {
			return nil, nil, err
		}
		roots := pool
		if mqttCA != "" {
			certs, err := station.ReadCertificates(mqttCA)
			if err != nil {
				return nil, nil, usageError{fmt.Errorf("--coap-mqtt-ca: %w", err)}
			}
			roots = x509.NewCertPool()
			for _, c := range certs {
				roots.AddCert(c)
			}
		}
		rp, err := republish.New(republish.Config{Broker: mqttURL, TLS: &tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: roots, MinVersion: tls.VersionTLS12}})
		if err != nil {
			return nil, nil, usageError{err}
		}
		sinks = append(sinks, rp)
		closers = append(closers, rp.Close)
	}
	c, err := collector.New(collector.Config{
		Addr: listen, Certificate: cert, ClientCAs: pool, Revoked: s.CertificateRevoked,
		Sink: collector.SinkFunc(func(ctx context.Context, id string, p senml.Pack) error {
			// Every sink must take the records before the device hears
			// 2.04; a failure makes it resend (duplicates are dropped by
			// sequence number downstream).
			for _, sk := range sinks {
				if err := sk.Write(ctx, id, p); err != nil {
					return err
				}
			}
			return nil
		}),
		Logger: log,
	})
	if err != nil {
		return nil, nil, usageError{err}
	}
	return c, func() {
		for _, f := range closers {
			f()
		}
	}, nil
}
