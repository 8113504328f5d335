module iotagent.dev/iotagent

go 1.26.0

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/eclipse/paho.mqtt.golang v1.5.1
	github.com/google/go-tpm v0.9.8
	github.com/mochi-mqtt/server/v2 v2.7.9
	github.com/pion/dtls/v3 v3.1.15
	github.com/pion/logging v0.2.4
	github.com/plgd-dev/go-coap/v3 v3.8.1
	github.com/smallstep/pkcs7 v0.2.3
	go.etcd.io/bbolt v1.5.0
	go.mozilla.org/pkcs7 v0.0.0-20200128120323-432b2356ecb1
	golang.org/x/net v0.62.0
)

require (
	github.com/dsnet/golib/memfile v1.0.0 // indirect
	github.com/gorilla/websocket v1.5.3 // indirect
	github.com/pion/transport/v5 v5.1.4 // indirect
	github.com/rs/xid v1.4.0 // indirect
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/exp v0.0.0-20261014143641-f0251eb4aa3e // indirect
	golang.org/x/sync v0.24.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
