package coap_test

import (
	"os"
	"testing"

	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

func stationtestStart(t testing.TB) *stationtest.Station {
	return stationtest.Start(t, stationtest.Options{AutoApprove: true})
}
