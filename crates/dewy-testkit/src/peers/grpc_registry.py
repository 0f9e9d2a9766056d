"""A dewy.RegistryService implemented with grpcio, as a team's own service
would be: the test peer of dewy's grpc:// registry.

Usage: grpc_registry.py PROTO_DIR WORK_DIR PORT [CERT KEY [CLIENT_CA]]

Each call reads WORK_DIR/state.json (written by the test):
  {"release": {"id", "tag", "url", "created_at"?},
   "not_found": {"created_at"?} | null,   # answer NOT_FOUND
   "unavailable": N,                       # answer UNAVAILABLE N more times
   "token": "..." | null}                  # require `authorization: Bearer`
and appends each request to WORK_DIR/requests.jsonl and each report to
WORK_DIR/reports.jsonl.
"""
import json
import os
import sys
import threading
from concurrent import futures

import grpc
import grpc_tools
from grpc_tools import protoc

proto_dir, work, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = os.path.join(work, "gen")
os.makedirs(out, exist_ok=True)
well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
if protoc.main(["protoc", "-I" + proto_dir, "-I" + well_known, "--python_out=" + out,
                "--grpc_python_out=" + out, os.path.join(proto_dir, "dewy.proto")]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, out)
import dewy_pb2  # noqa: E402
import dewy_pb2_grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402

lock = threading.Lock()


def state():
    with open(os.path.join(work, "state.json")) as f:
        return json.load(f)


def append(name, record):
    with lock, open(os.path.join(work, name), "a") as f:
        f.write(json.dumps(record) + "\n")


def authorize(st, context):
    token = st.get("token")
    if token and dict(context.invocation_metadata()).get("authorization") != "Bearer " + token:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class Registry(dewy_pb2_grpc.RegistryServiceServicer):
    def Current(self, request, context):
        metadata = dict(context.invocation_metadata())
        append("requests.jsonl", {
            "arch": request.arch,
            "os": request.os,
            "artifact_name": request.arifact_name if request.HasField("arifact_name") else None,
            "authorization": metadata.get("authorization"),
        })
        with lock:
            st = state()
            if st.get("unavailable", 0) > 0:
                st["unavailable"] -= 1
                tmp = os.path.join(work, "state.json.tmp")
                with open(tmp, "w") as f:
                    json.dump(st, f)
                os.replace(tmp, os.path.join(work, "state.json"))
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        authorize(st, context)
        nf = st.get("not_found")
        if nf is not None:
            if nf.get("created_at"):
                context.set_trailing_metadata((("created-at", nf["created_at"]),))
            context.abort(grpc.StatusCode.NOT_FOUND, "no artifact for %s/%s yet" % (request.os, request.arch))
        r = st["release"]
        resp = dewy_pb2.CurrentResponse(id=r["id"], tag=r["tag"], artifact_url=r["url"])
        if r.get("created_at"):
            resp.created_at.FromJsonString(r["created_at"])
        return resp

    def Report(self, request, context):
        authorize(state(), context)
        append("reports.jsonl", {
            "id": request.id,
            "tag": request.tag,
            "command": request.command,
            "err": request.err if request.HasField("err") else None,
        })
        return empty_pb2.Empty()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
dewy_pb2_grpc.add_RegistryServiceServicer_to_server(Registry(), server)
address = "127.0.0.1:%d" % port
if len(sys.argv) > 5:
    cert, key = open(sys.argv[4], "rb").read(), open(sys.argv[5], "rb").read()
    client_ca = open(sys.argv[6], "rb").read() if len(sys.argv) > 6 else None
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                        require_client_auth=client_ca is not None)
    server.add_secure_port(address, creds)
else:
    server.add_insecure_port(address)
server.start()
print("ready", flush=True)
server.wait_for_termination()
