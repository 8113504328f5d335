package mqtttest_test

import (
	"os"
	"testing"

	"iotagent.dev/iotagent/tpm/tpmtest"
)

// stationtest reads the tpmtest manufacturer CA.
func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }
