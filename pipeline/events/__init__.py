"""Change events: the Avro contracts (Debezium-compatible envelope), value conversion and the
Confluent wire format."""
