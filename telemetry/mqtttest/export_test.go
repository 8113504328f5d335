package mqtttest

// MQTTConnect exposes mqttConnect to the tests.
var MQTTConnect = mqttConnect
