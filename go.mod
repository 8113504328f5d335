module iotagent.dev/iotagent

go 1.26

require (
	github.com/google/go-tpm v0.9.8
	github.com/smallstep/pkcs7 v0.2.3
	go.etcd.io/bbolt v1.5.0
)

require golang.org/x/sys v0.45.0 // indirect
