package senml_test

import (
	"fmt"
	"log"
	"time"

	"iotagent.dev/iotagent/telemetry/senml"
)

func ExampleParseJSON() {
	p, err := senml.ParseJSON([]byte(`[
		{"bn":"urn:dev:ow:10e2073a01080063:","bt":1320067464,"bu":"%RH","v":20.5,"seq":7},
		{"n":"bat","u":"%EL","t":-60,"v":98,"seq":8}
	]`))
	if err != nil {
		log.Fatal(err)
	}
	r, err := p.Resolve(time.Now())
	if err != nil {
		log.Fatal(err)
	}
	for _, rec := range r {
		fmt.Printf("%d %s %v %s at %v\n", rec.Seq, rec.Name, *rec.Value, rec.Unit, time.Unix(int64(*rec.Time), 0).UTC())
	}
	// Output:
	// 8 urn:dev:ow:10e2073a01080063:bat 98 %EL at 2011-10-31 13:23:24 +0000 UTC
	// 7 urn:dev:ow:10e2073a01080063: 20.5 %RH at 2011-10-31 13:24:24 +0000 UTC
}

func ExampleParseJSON_invalid() {
	_, err := senml.ParseJSON([]byte(`[{"n":"temp","v":21.5},{"n":"temp","v":"warm"}]`))
	fmt.Println(err)
	// Output: senml: record 1: "v" is a string, want a number
}

func ExamplePack_Split() {
	var p senml.Pack
	for i := range 100 {
		p = append(p, senml.Record{Name: "temp", Unit: "Cel", Time: new(float64(i)), Value: new(21.5 + float64(i)/10), Seq: uint64(1000 + i)})
	}
	p[0].BaseName, p[0].BaseTime = new("urn:dev:ow:10e2073a01080063:"), new(1700000000.0)
	// One CoAP payload per chunk; acknowledge its records once delivered.
	chunks, err := p.Split(senml.Pack.EncodeCBOR, 1152)
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range chunks {
		seqs := c.Seqs()
		fmt.Printf("%d bytes: records %d to %d\n", len(c.Data), seqs[0], seqs[len(seqs)-1])
	}
	// Output:
	// 1145 bytes: records 1000 to 1036
	// 1146 bytes: records 1037 to 1072
	// 870 bytes: records 1073 to 1099
}
