#!/usr/bin/env python3
"""Writes tests/fixtures/protobuf/: Debezium messages serialised by Confluent's own Protobuf
serializer (confluent_kafka.schema_registry.protobuf.ProtobufSerializer, PyPI confluent-kafka
with the protobuf runtime, pinned in scripts/install-deps.sh), so the daemon's Protobuf reader is
tested against real bytes: the Confluent framing with its message-index path, and the message
encoded by Google's protobuf runtime.

Each message is one of the schema-enveloped JsonConverter fixtures that
scripts/gen-avro-fixtures.py also uses (cited in their READMEs): its Connect schema is turned into
the .proto file Kafka Connect's ProtobufConverter registers, following
ProtobufData.fromConnectSchema (confluentinc/schema-registry,
protobuf-converter/src/main/java/io/confluent/connect/protobuf/ProtobufData.java):
- the struct's Connect name gives the package and the message name; a nested struct is a message
  nested in the message that first uses it, named by the last part of its Connect name (with
  "Message" appended when that equals the field's name); fields are numbered from 1 in order;
- int8/int16 -> int32 with (confluent.field_meta).params connect.type; int32/int64/float32/
  float64/boolean/string/bytes -> int32/int64/float/double/bool/string/bytes;
- Connect Decimal -> confluent.type.Decimal with params precision and scale; Connect Date ->
  google.type.Date; Time -> google.type.TimeOfDay; Timestamp -> google.protobuf.Timestamp;
- other named primitives (io.debezium.time.*, io.debezium.data.Enum) keep their base type: the
  converter writes no Connect name for them;
- with optional.for.nullables=true (the setting the README recommends), an optional field is a
  proto3 `optional` field, so a null stays null; the `-defaults` cases use the converter's
  default (no label), where a null is simply not written and reads back as 0 or "".
The .proto text is compiled with protoc (PyPI grpcio-tools) and the message built from the JSON
payload with Google's protobuf runtime; the serializer registers the file and, as references,
each file it imports (skip.known.types false, its default), with the stand-in registry below.

schemas.json records, per schema id, what the Schema Registry's REST API answers for it:
schemaType PROTOBUF, the schema as .proto text (the registry answers with text, whatever form
it was registered in), and the references (name, subject, version); tests/support/registry.rs
serves them.

Usage: python3 scripts/gen-protobuf-fixtures.py   (from the repository root)
"""

import base64
import copy
import datetime
import importlib.util
import json
import os
import tempfile
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import unquote

import grpc_tools
from grpc_tools import protoc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "protobuf")

# The Avro generator's helpers that are not about Avro: `complete` (payload fields an abbreviated
# fixture schema leaves out) and `unwrapped` (the ExtractNewRecordState form).
_spec = importlib.util.spec_from_file_location("gen_avro", os.path.join(ROOT, "scripts", "gen-avro-fixtures.py"))
gen_avro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_avro)

# name -> (fixture file, topic, is key, optional.for.nullables)
CASES = [
    ("pg-update", "tests/fixtures/debezium/pg-update-with-schema.json", "shop.public.products", False, True),
    ("pg-update-defaults", "tests/fixtures/debezium/pg-update-with-schema.json", "shop.public.products", False, False),
    ("pg-key-42", "tests/fixtures/debezium-real/key-products-42-schema.json", "shop.public.products", True, True),
    ("pg-adaptive-temporal", "tests/fixtures/debezium-real/pg-adaptive-temporal.json", "shop.public.orders", False, True),
    ("mysql-connect-temporal", "tests/fixtures/debezium-real/mysql-connect-temporal.json", "shopdb.shop.orders", False, True),
    ("sqlserver-create", "tests/fixtures/debezium-real/sqlserver-create.json", "server1.testDB.dbo.customers", False, True),
    ("heartbeat", "tests/fixtures/debezium-real/heartbeat-schema.json", "__debezium-heartbeat.shop", False, True),
    ("unwrap-update", "tests/fixtures/avro/unwrap-update.json", "shop.public.products", False, True),
]

SCALAR = {
    "int8": "int32", "int16": "int32", "int32": "int32", "int64": "int64", "float32": "float",
    "float64": "double", "boolean": "bool", "string": "string", "bytes": "bytes",
}
LOGICAL = {
    "org.apache.kafka.connect.data.Decimal": ("confluent.type.Decimal", "confluent/type/decimal.proto"),
    "org.apache.kafka.connect.data.Date": ("google.type.Date", "google/type/date.proto"),
    "org.apache.kafka.connect.data.Time": ("google.type.TimeOfDay", "google/type/timeofday.proto"),
    "org.apache.kafka.connect.data.Timestamp": ("google.protobuf.Timestamp", "google/protobuf/timestamp.proto"),
}

# Files every Confluent registry knows (ProtobufSchema.KNOWN_DEPENDENCIES) that protoc does not
# ship: confluent/meta.proto, confluent/type/decimal.proto, google/type/date.proto and
# timeofday.proto, the same texts the daemon builds in (src/source/debezium/known-protos/).
KNOWN_DIR = os.path.join(ROOT, "src", "source", "debezium", "known-protos")
KNOWN = {}
for _dir, _, _files in os.walk(KNOWN_DIR):
    for _name in _files:
        with open(os.path.join(_dir, _name)) as _f:
            KNOWN[os.path.relpath(os.path.join(_dir, _name), KNOWN_DIR)] = _f.read()


def short(name):
    return name.rsplit(".", 1)[-1]


class ProtoFile:
    """The .proto text ProtobufData writes for one Connect struct schema."""

    def __init__(self, schema, optional_for_nullables):
        self.optional = optional_for_nullables
        self.imports = set()
        self.defined = set()
        package, _, name = schema["name"].rpartition(".")
        self.package = package
        self.name = name
        self.defined.add(schema["name"])
        self.body = self.message(name, schema, "")

    def message(self, name, schema, indent):
        lines = ["%smessage %s {" % (indent, name)]
        nested = []
        for tag, field in enumerate(schema["fields"], start=1):
            lines.append(indent + "  " + self.field(field, tag, nested, indent + "  "))
        for n in nested:
            lines.append(n)
        lines.append(indent + "}")
        return "\n".join(lines)

    def field(self, schema, tag, nested, indent):
        fname = schema["field"]
        label = ""
        t = schema["type"]
        if t == "array":
            label = "repeated "
            schema = schema["items"]
            t = schema["type"]
        elif self.optional and schema.get("optional"):
            label = "optional "
        params = {}
        name = schema.get("name")
        if name in LOGICAL:
            ptype, location = LOGICAL[name]
            self.imports.add(location)
            if name == "org.apache.kafka.connect.data.Decimal":
                p = schema.get("parameters", {})
                if "connect.decimal.precision" in p:
                    params["precision"] = p["connect.decimal.precision"]
                if "scale" in p:
                    params["scale"] = p["scale"]
        elif t == "struct":
            ptype = short(name)
            if ptype == fname:
                ptype += "Message"
            if name not in self.defined:
                self.defined.add(name)
                nested.append(self.message(ptype, schema, indent))
        elif t == "map":
            raise ValueError("maps do not occur in the fixtures")
        else:
            ptype = SCALAR[t]
            if t in ("int8", "int16"):
                params["connect.type"] = t
        options = ""
        if params:
            self.imports.add("confluent/meta.proto")
            entries = ", ".join('{ key: "%s", value: "%s" }' % kv for kv in sorted(params.items()))
            options = " [(confluent.field_meta) = { params: [%s] }]" % entries
        return "%s%s %s = %d%s;" % (label, ptype, fname, tag, options)

    def text(self):
        out = ['syntax = "proto3";', "package %s;" % self.package, ""]
        for i in sorted(self.imports):
            out.append('import "%s";' % i)
        if self.imports:
            out.append("")
        out.append(self.body)
        return "\n".join(out) + "\n"


def fill(msg, schema, value):
    """Sets `msg`'s fields from the JsonConverter payload `value` as ProtobufData.fromConnectData
    does: a null is not written."""
    for f in schema["fields"]:
        v = value.get(f["field"])
        if v is None:
            continue
        put(msg, f["field"], f, v)


def put(msg, fname, schema, v):
    t = schema["type"]
    name = schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        d = getattr(msg, fname)
        d.value = base64.b64decode(v)
        d.scale = int(schema["parameters"]["scale"])
        if "connect.decimal.precision" in schema["parameters"]:
            d.precision = int(schema["parameters"]["connect.decimal.precision"])
    elif name == "org.apache.kafka.connect.data.Date":
        day = datetime.date(1970, 1, 1) + datetime.timedelta(days=v)
        d = getattr(msg, fname)
        d.year, d.month, d.day = day.year, day.month, day.day
    elif name == "org.apache.kafka.connect.data.Time":
        d = getattr(msg, fname)
        ms = int(v)
        d.hours, d.minutes, d.seconds, d.nanos = ms // 3600000, ms // 60000 % 60, ms // 1000 % 60, ms % 1000 * 1000000
    elif name == "org.apache.kafka.connect.data.Timestamp":
        d = getattr(msg, fname)
        d.seconds, d.nanos = int(v) // 1000, int(v) % 1000 * 1000000
    elif t == "struct":
        fill(getattr(msg, fname), schema, v)
    elif t == "array":
        getattr(msg, fname).extend(v)
    elif t == "bytes":
        setattr(msg, fname, base64.b64decode(v))
    elif t in ("int8", "int16", "int32", "int64"):
        # SQL Server's documented example writes `event_serial_no` as "1"; the schema says int64.
        setattr(msg, fname, int(v))
    else:
        setattr(msg, fname, v)


class Registry(gen_avro.Registry):
    """The calls the Protobuf serializer makes: register (POST /subjects/{s}/versions) and look
    up (POST /subjects/{s}), per subject with versions (the Avro stand-in's answering kept)."""

    schemas = []  # (subject, version, schema as registered, references)

    def _find(self, subject, body):
        for i, (s, version, text, refs) in enumerate(Registry.schemas):
            if s == subject and text == body["schema"]:
                return i, version
        return None, None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path.split("?")[0].strip("/").split("/")
        subject = unquote(path[1])
        i, version = self._find(subject, body)
        if path[-1] == "versions":
            if i is None:
                version = 1 + sum(1 for s in Registry.schemas if s[0] == subject)
                Registry.schemas.append((subject, version, body["schema"], body.get("references", [])))
                i = len(Registry.schemas) - 1
            self._answer(200, {"id": i + 1})
        else:
            self._answer(200, {"subject": subject, "id": i + 1, "version": version, "schema": body["schema"]})


def compile_proto(include, name):
    """The FileDescriptorSet protoc writes for `name` and its imports."""
    out = os.path.join(include, "set.pb")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main(["protoc", "-I" + include, "-I" + well_known, "--include_imports",
                        "--descriptor_set_out=" + out, name])
    if code != 0:
        raise RuntimeError("protoc failed on %s" % name)
    fds = descriptor_pb2.FileDescriptorSet()
    with open(out, "rb") as f:
        fds.ParseFromString(f.read())
    return fds


def source_text(include, name):
    """The .proto text of a file, as the registry returns a registered schema."""
    for d in (include, os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")):
        p = os.path.join(d, name)
        if os.path.exists(p):
            with open(p) as f:
                return f.read()
    raise FileNotFoundError(name)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = SchemaRegistryClient({"url": "http://127.0.0.1:%d" % server.server_address[1]})
    os.makedirs(OUT, exist_ok=True)
    manifest = []
    texts = {}  # registered schema (base64 descriptor) -> .proto text
    with tempfile.TemporaryDirectory() as include:
        for path, text in KNOWN.items():
            os.makedirs(os.path.join(include, os.path.dirname(path)), exist_ok=True)
            with open(os.path.join(include, path), "w") as f:
                f.write(text)
        for name, path, topic, is_key, optional in CASES:
            with open(os.path.join(ROOT, path)) as f:
                doc = json.load(f)
            schema = copy.deepcopy(doc["schema"])
            gen_avro.complete(schema, doc["payload"])
            proto = ProtoFile(schema, optional)
            file_name = "%s.proto" % name
            with open(os.path.join(include, file_name), "w") as f:
                f.write(proto.text())
            pool = descriptor_pool.DescriptorPool()
            for fd in compile_proto(include, file_name).file:
                pool.Add(fd)
                texts[base64.standard_b64encode(fd.SerializeToString()).decode()] = source_text(include, fd.name)
            full = (proto.package + "." if proto.package else "") + proto.name
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
            msg = cls()
            fill(msg, schema, doc["payload"])
            serializer = ProtobufSerializer(cls, client, {"use.deprecated.format": False, "auto.register.schemas": True})
            field = MessageField.KEY if is_key else MessageField.VALUE
            data = serializer(msg, SerializationContext(topic, field))
            with open(os.path.join(OUT, name + ".pb"), "wb") as f:
                f.write(data)
            manifest.append({"name": name, "json": path, "topic": topic, "key": is_key,
                             "optional_for_nullables": optional})
    schemas = {}
    for i, (subject, version, registered, refs) in enumerate(Registry.schemas):
        text = texts.get(registered)
        if text is None:
            # The serializer registers the descriptors protoc built; each is in `texts`.
            raise RuntimeError("no .proto text for a schema registered under %s" % subject)
        schemas[str(i + 1)] = {"subject": subject, "version": version, "schemaType": "PROTOBUF",
                               "schema": text, "references": refs}
    gen_avro.write_json(os.path.join(OUT, "schemas.json"), schemas, True)
    gen_avro.write_json(os.path.join(OUT, "manifest.json"), manifest)
    server.shutdown()


if __name__ == "__main__":
    main()
