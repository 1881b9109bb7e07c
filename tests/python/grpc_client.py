"""A registry client in Python (grpcio), to prove other languages can talk to the hub.

Usage: grpc_client.py HOST:PORT PROTO_ROOT

Generates stubs from the project's .proto with grpc_tools (no system protoc), then checks
health, lists services over server reflection, lists bases and uploads a blob.
"""

import sys
import tempfile

import blake3
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc


def main() -> int:
    addr, proto_root = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp()
    rc = protoc.main(
        ["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}",
         "delta/registry/v1/registry.proto"]
    )
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    sys.path.insert(0, out)
    from delta.registry.v1 import registry_pb2 as pb, registry_pb2_grpc as rpc  # noqa: E402

    channel = grpc.insecure_channel(addr)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))

    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    for s in services:
        print("reflection:", s)

    stub = rpc.RegistryStub(channel)
    bases = stub.ListBases(pb.ListBasesRequest())
    print("bases:", ",".join(b.name for b in bases.bases))

    data = bytes(range(256)) * 12289  # a little over 3 MiB: several chunks
    digest = "blake3:" + blake3.blake3(data).hexdigest()
    started = stub.StartUpload(pb.StartUploadRequest(digest=digest, size=len(data)))
    chunk = 1 << 20

    def chunks():
        for off in range(0, len(data), chunk):
            yield pb.UploadChunk(upload_id=started.upload_id, offset=off, data=data[off:off + chunk])

    done = stub.UploadBlob(chunks())
    assert done.committed and done.digest == digest, done
    back = b"".join(c.data for c in stub.DownloadBlob(pb.DownloadBlobRequest(digest=digest)))
    assert back == data
    print("upload: committed", digest)

    try:
        stub.Resolve(pb.ResolveRequest(reference="nobody/nothing"))
        print("resolve of a missing reference succeeded", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print("resolve: NOT_FOUND", e.details())
    return 0


if __name__ == "__main__":
    sys.exit(main())
