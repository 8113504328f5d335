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

	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/internal/rungroup"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/collector"
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
		// Devices resume their TLS sessions across a restart of the broker.
		TicketKeyFile: filepath.Join(*dir, "demo-broker-ticket.keys"),
		Revoked:       demobroker.CRLFile(filepath.Join(*dir, "crl.pem")), ReaderFirst: *readerFirst, Logger: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "demo broker (for the demo only) on mqtts://%s\n", *listen)
	if e.ready != nil {
		e.ready(*listen)
	}
	return b.Run(ctx)
}

// watchClientName is the certificate name watch issues itself from a
// station directory: the backend reader the broker's ACL lets read every
// device's telemetry.
const watchClientName = "fleet-reader"

// cmdWatch subscribes to every device's telemetry and reports delivery per
// device. With --dir, what the command needs from the station comes from
// there: the CA certificates verifying the broker (which the station
// certified) and, unless --cert and --key are given, a client certificate
// issued for this run, never written to disk.
func cmdWatch(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "watch")
	dir := fs.String("dir", "", "station `DIR`ectory: defaults --ca to the station's CA certificates and, without --cert/--key, issues a "+watchClientName+" client certificate for this run")
	broker := fs.String("broker", "", "broker `URL`, mqtts://HOST:PORT")
	certFile := fs.String("cert", "", "client certificate `FILE` (iotstation issue --name "+watchClientName+")")
	keyFile := fs.String("key", "", "its key `FILE`")
	caFile := fs.String("ca", "", "CA `FILE` that verifies the broker (default with --dir: the station's CA certificates)")
	dur := fs.Duration("for", 0, "stop after this long (default: until interrupted)")
	out := fs.String("json", "", "also write the per-device report to this `FILE` as JSON")
	persistent := fs.Bool("persistent", false, "keep a persistent session, so the broker queues what arrives while the watcher is away")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case *broker == "":
		return usagef("watch: --broker is required")
	case (*certFile == "") != (*keyFile == ""):
		return usagef("watch: --cert and --key go together")
	case *dir == "" && (*certFile == "" || *caFile == ""):
		return usagef("watch: --cert, --key and --ca are required without --dir")
	}
	var cert tls.Certificate
	var roots []*x509.Certificate
	if *dir != "" && (*certFile == "" || *caFile == "") {
		var err error
		if cert, roots, err = watchCredentials(ctx, *dir, *certFile == ""); err != nil {
			return err
		}
	}
	if *certFile != "" {
		var err error
		if cert, err = tls.LoadX509KeyPair(*certFile, *keyFile); err != nil {
			return usageError{fmt.Errorf("watch: %w", err)}
		}
	}
	if *caFile != "" {
		var err error
		if roots, err = certpem.ReadFile(*caFile); err != nil {
			return usageError{fmt.Errorf("watch: --ca: %w", err)}
		}
	}
	w, err := watch.New(watch.Config{Broker: *broker, Persistent: *persistent, TLS: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: certpem.Pool(roots), MinVersion: tls.VersionTLS12},
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

// watchCredentials reads from the station in dir its CA certificates and,
// with issue, a client certificate for watch. The station is released
// before the watch starts: a station directory opened directly stays
// locked while open.
func watchCredentials(ctx context.Context, dir string, issue bool) (tls.Certificate, []*x509.Certificate, error) {
	a, err := station.OpenAdmin(dir)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	defer a.Close()
	trust, err := a.TrustPEM(ctx)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	roots, err := certpem.Parse(trust)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("station CA certificates: %w", err)
	}
	if !issue {
		return tls.Certificate{}, roots, nil
	}
	// The key lives in this process only; the lifetime outlasts any watch.
	sc, err := a.IssueService(ctx, station.ServiceRequest{Name: watchClientName, Lifetime: 365 * 24 * time.Hour})
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("watch: client certificate: %w", err)
	}
	cert, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return cert, roots, nil
}

// newCollector builds the CoAP/DTLS collector of iotstation serve: a
// server certificate from the station's CA, device certificates checked
// against the registry (revocation is immediate), records to a JSON-lines
// file and, optionally, republished to MQTT. Its certificates live as
// long as a device's and are renewed while it serves: run runs their
// renewals.
func newCollector(s *station.Station, dir, listen, sinkPath, mqttURL, mqttCA, san string, log *slog.Logger) (c *collector.Collector, closeSinks func(), run []rungroup.Part, err error) {
	sans := []string{"localhost", "127.0.0.1", "::1"}
	if san != "" {
		sans = append([]string{san}, sans...)
	} else if host, _, err := net.SplitHostPort(listen); err == nil && host != "" {
		sans = append([]string{host}, sans...)
	}
	ctx := context.Background()
	server, err := station.NewServiceIdentity(ctx, station.ServiceRequest{Name: "coap-collector", SANs: sans, Server: true, Lifetime: s.CertLifetime()}, s.IssueService, log)
	if err != nil {
		return nil, nil, nil, err
	}
	run = append(run, rungroup.Part{Name: "collector certificate", Run: server.Run})
	pool := certpem.Pool(s.CACerts())
	if sinkPath == "" {
		sinkPath = filepath.Join(dir, "telemetry.jsonl")
	}
	file, err := collector.NewJSONLinesSink(sinkPath)
	if err != nil {
		return nil, nil, nil, err
	}
	sinks := []collector.Sink{file}
	closers := []func() error{file.Close}
	if mqttURL != "" {
		client, err := station.NewServiceIdentity(ctx, station.ServiceRequest{Name: "coap-collector", Lifetime: s.CertLifetime()}, s.IssueService, log)
		if err != nil {
			return nil, nil, nil, err
		}
		run = append(run, rungroup.Part{Name: "republisher certificate", Run: client.Run})
		roots := pool
		if mqttCA != "" {
			certs, err := certpem.ReadFile(mqttCA)
			if err != nil {
				return nil, nil, nil, usageError{fmt.Errorf("--coap-mqtt-ca: %w", err)}
			}
			roots = certpem.Pool(certs)
		}
		rp, err := republish.New(republish.Config{Broker: mqttURL, TLS: &tls.Config{GetClientCertificate: client.GetClientCertificate, RootCAs: roots, MinVersion: tls.VersionTLS12}})
		if err != nil {
			return nil, nil, nil, usageError{err}
		}
		sinks = append(sinks, rp)
		closers = append(closers, rp.Close)
	}
	c, err = collector.New(collector.Config{
		Addr: listen, GetCertificate: server.Certificate, ClientCAs: pool, Revoked: s.CertificateRevoked,
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
		// The windows survive restarts (upgrades): a resent batch is not
		// written twice.
		DedupeFile: filepath.Join(dir, "collector-dedupe.bin"),
		Logger:     log,
	})
	if err != nil {
		return nil, nil, nil, usageError{err}
	}
	return c, func() {
		for _, f := range closers {
			f()
		}
	}, run, nil
}
