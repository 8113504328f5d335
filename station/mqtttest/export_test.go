package mqtttest

// MQTTConnect exposes mqttConnect: tests speak MQTT over connections
// they set up themselves.
var MQTTConnect = mqttConnect

// SetSubscriberBuffer makes b's next Subscriber hold n messages instead
// of MessageBuffer, so that a test can overflow it quickly.
func SetSubscriberBuffer(b *Broker, n int) { b.subBuffer = n }

// Dropped returns how many messages s dropped.
func (s *Subscriber) Dropped() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}
