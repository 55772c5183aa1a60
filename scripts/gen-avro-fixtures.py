#!/usr/bin/env python3
"""Writes tests/fixtures/avro/: Debezium messages serialised by Confluent's own Avro serializer
(confluent_kafka.schema_registry.avro.AvroSerializer, PyPI confluent-kafka, pinned in
scripts/install-deps.sh), so the daemon's Avro reader is tested against real bytes.

Each message is one of the schema-enveloped JsonConverter fixtures in tests/fixtures/debezium*/
(themselves from Debezium's docs and code, cited in their READMEs): its Connect schema is turned
into the Avro schema Kafka Connect's AvroConverter registers, following AvroData.fromConnectSchema
(confluentinc/schema-registry, avro-data/src/main/java/io/confluent/connect/avro/AvroData.java):
struct -> record named after the Connect name (with `connect.name`), optional -> ["null", T] with
default null, int8/int16 -> int with `connect.type`, a named logical type -> its base type with
`connect.name`/`connect.version`/`connect.parameters` (Decimal: bytes with `scale`, `precision`,
logicalType decimal; Connect Date/Time/Timestamp: logicalType date/time-millis/timestamp-millis),
a record name used twice -> a reference. The payload is serialised with that schema; the Rust
test then checks the Avro path decodes each to exactly the event the JSON path decodes.

The serializer needs a registry to register with; this script runs a minimal in-process stand-in
for the two calls the serializer makes (POST /subjects/{s}/versions, GET /schemas/ids/{id});
tests/support/registry.rs serves the written schemas to the daemon.

Usage: python3 scripts/gen-avro-fixtures.py   (from the repository root)
"""

import base64
import copy
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "avro")

# name -> (fixture file, topic, is key)
CASES = [
    ("pg-update", "tests/fixtures/debezium/pg-update-with-schema.json", "shop.public.products", False),
    ("pg-key-42", "tests/fixtures/debezium-real/key-products-42-schema.json", "shop.public.products", True),
    ("pg-adaptive-temporal", "tests/fixtures/debezium-real/pg-adaptive-temporal.json", "shop.public.orders", False),
    ("mysql-connect-temporal", "tests/fixtures/debezium-real/mysql-connect-temporal.json", "shopdb.shop.orders", False),
    ("sqlserver-create", "tests/fixtures/debezium-real/sqlserver-create.json", "server1.testDB.dbo.customers", False),
    ("heartbeat", "tests/fixtures/debezium-real/heartbeat-schema.json", "__debezium-heartbeat.shop", False),
    ("unwrap-update", "tests/fixtures/avro/unwrap-update.json", "shop.public.products", False),
]

LOGICAL = {
    "org.apache.kafka.connect.data.Date": "date",
    "org.apache.kafka.connect.data.Time": "time-millis",
    "org.apache.kafka.connect.data.Timestamp": "timestamp-millis",
}
PRIMITIVE = {
    "int8": "int", "int16": "int", "int32": "int", "int64": "long", "float32": "float",
    "float64": "double", "boolean": "boolean", "string": "string", "bytes": "bytes",
}


def to_avro(schema, seen):
    """The Avro schema AvroData writes for a Connect schema (not optional-wrapped)."""
    t = schema["type"]
    name = schema.get("name")
    if t == "struct":
        full = name or "io.confluent.connect.avro.ConnectDefault"
        if full in seen:
            return full
        seen.add(full)
        ns, _, short = full.rpartition(".")
        rec = {"type": "record", "name": short, "fields": []}
        if ns:
            rec["namespace"] = ns
        for f in schema["fields"]:
            field = {"name": f["field"], "type": field_type(f, seen)}
            if f.get("optional"):
                field["default"] = None
            rec["fields"].append(field)
        if name:
            rec["connect.name"] = name
        return rec
    if t == "array":
        return {"type": "array", "items": field_type(schema["items"], seen)}
    if t == "map":
        return {"type": "map", "values": field_type(schema["values"], seen)}
    out = {"type": PRIMITIVE[t]}
    if t in ("int8", "int16"):
        out["connect.type"] = t
    if name:
        if "version" in schema:
            out["connect.version"] = schema["version"]
        params = schema.get("parameters")
        if params:
            out["connect.parameters"] = params
        out["connect.name"] = name
        if name == "org.apache.kafka.connect.data.Decimal":
            out["scale"] = int(params["scale"])
            if "connect.decimal.precision" in params:
                out["precision"] = int(params["connect.decimal.precision"])
            out["logicalType"] = "decimal"
        elif name in LOGICAL:
            out["logicalType"] = LOGICAL[name]
    if out == {"type": PRIMITIVE[t]}:
        return PRIMITIVE[t]
    return out


def field_type(schema, seen):
    inner = to_avro(schema, seen)
    return ["null", inner] if schema.get("optional") else inner


def to_datum(schema, value):
    """The JsonConverter payload value as the Python value fastavro writes for the Avro type."""
    if value is None:
        return None
    t = schema["type"]
    if t == "struct":
        return {f["field"]: to_datum(f, value.get(f["field"])) for f in schema["fields"]}
    if t == "array":
        return [to_datum(schema["items"], v) for v in value]
    if t == "map":
        return {k: to_datum(schema["values"], v) for k, v in value.items()}
    if t == "bytes":
        return base64.b64decode(value)
    if t in ("int8", "int16", "int32", "int64") and isinstance(value, str):
        # SQL Server's documented example writes `event_serial_no` as "1"; the Connect schema
        # says int64, which is what the connector sends.
        return int(value)
    return value


def complete(schema, value):
    """Adds payload fields a fixture's abbreviated schema leaves out (a documented `source` block
    shortened to a few fields) as optional fields of the type Debezium's Source schema gives
    them (int64 for numbers, string for text), so nothing of the payload is dropped."""
    if schema.get("type") != "struct" or not isinstance(value, dict):
        return
    known = {f["field"]: f for f in schema["fields"]}
    for k, v in value.items():
        if k in known:
            complete(known[k], v)
        elif isinstance(v, bool):
            schema["fields"].append({"type": "boolean", "optional": True, "field": k})
        elif isinstance(v, int):
            schema["fields"].append({"type": "int64", "optional": True, "field": k})
        elif isinstance(v, str):
            schema["fields"].append({"type": "string", "optional": True, "field": k})


class Registry(BaseHTTPRequestHandler):
    schemas = []

    def log_message(self, *args):
        pass

    def _answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["schema"]
        if text not in Registry.schemas:
            Registry.schemas.append(text)
        self._answer(200, {"id": Registry.schemas.index(text) + 1})

    def do_GET(self):
        sid = int(self.path.rstrip("/").split("/")[-1])
        self._answer(200, {"schema": Registry.schemas[sid - 1]})


def unwrapped(path, out_path):
    """ExtractNewRecordState's form of an envelope fixture (`add.fields=op,table`,
    `delete.handling.mode=rewrite`): the `after` struct, plus `__op`, `__table` and `__deleted`
    as optional strings, as the SMT's schema update adds them (debezium/debezium,
    debezium-core/src/main/java/io/debezium/transforms/ExtractNewRecordState.java). Written as
    the JsonConverter message too, so the test compares the two forms."""
    with open(os.path.join(ROOT, path)) as f:
        doc = json.load(f)
    after = next(f for f in doc["schema"]["fields"] if f["field"] == "after")
    schema = {k: v for k, v in after.items() if k not in ("field", "optional")}
    schema["optional"] = False
    schema["fields"] = list(after["fields"]) + [
        {"type": "string", "optional": True, "field": "__op"},
        {"type": "string", "optional": True, "field": "__table"},
        {"type": "string", "optional": True, "field": "__deleted"},
    ]
    payload = dict(doc["payload"]["after"])
    payload.update({"__op": doc["payload"]["op"], "__table": doc["payload"]["source"]["table"], "__deleted": "false"})
    with open(os.path.join(ROOT, out_path), "w") as f:
        json.dump({"schema": schema, "payload": payload}, f)
        f.write("\n")


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = SchemaRegistryClient({"url": "http://127.0.0.1:%d" % server.server_address[1]})
    os.makedirs(OUT, exist_ok=True)
    unwrapped("tests/fixtures/debezium/pg-update-with-schema.json", "tests/fixtures/avro/unwrap-update.json")
    manifest = []
    for name, path, topic, is_key in CASES:
        with open(os.path.join(ROOT, path)) as f:
            doc = json.load(f)
        schema = copy.deepcopy(doc["schema"])
        complete(schema, doc["payload"])
        avro = to_avro(schema, set())
        serializer = AvroSerializer(client, json.dumps(avro), conf={"auto.register.schemas": True})
        field = MessageField.KEY if is_key else MessageField.VALUE
        data = serializer(to_datum(schema, doc["payload"]), SerializationContext(topic, field))
        with open(os.path.join(OUT, name + ".avro"), "wb") as f:
            f.write(data)
        manifest.append({"name": name, "json": path, "topic": topic, "key": is_key})
    write_json(os.path.join(OUT, "schemas.json"), {str(i + 1): s for i, s in enumerate(Registry.schemas)}, True)
    write_json(os.path.join(OUT, "manifest.json"), manifest)
    server.shutdown()


def write_json(path, value, sort_keys=False):
    """A fixture index as the tests read it: indented, one trailing newline."""
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=sort_keys)
        f.write("\n")


if __name__ == "__main__":
    main()
