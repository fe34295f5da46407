"""The client against a running agent.

Run by the end-to-end suite (tests/tests/python_client.rs), which starts an
agent and passes its socket in KVM_AGENT_TEST_SOCKET and a uuid for the
instance these tests start in KVM_AGENT_TEST_UUID, and for the TLS
channel the agent's loopback address and an operator's certificate in
KVM_AGENT_TEST_TLS_TARGET, _CERT, _KEY and _CA.
"""

import os
import unittest

import grpc

import kvm_agent_client as kac
from kvm_agent_client import pb
from kvm_agent_client._stubs.kvmagent.v1 import agent_pb2_grpc

ENV = os.environ
SOCKET = ENV["KVM_AGENT_TEST_SOCKET"]
UUID = ENV["KVM_AGENT_TEST_UUID"]


class UnixSocketAuthority(unittest.TestCase):
    def test_stock_grpcio_channel_is_refused_by_the_agent(self):
        # grpcio >= 1.57 sends the percent-encoded socket path as :authority,
        # which the agent's HTTP/2 layer rejects. This is why the client
        # sets grpc.default_authority.
        major, minor = (int(p) for p in grpc.__version__.split(".")[:2])
        self.assertGreaterEqual((major, minor), (1, 57), grpc.__version__)
        with grpc.insecure_channel(f"unix://{SOCKET}") as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            with self.assertRaises(grpc.RpcError) as refused:
                stub.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
        self.assertIn(
            refused.exception.code(),
            (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL),
            refused.exception.details(),
        )

    def test_client_channel_reaches_the_agent(self):
        with kac.Client.unix(SOCKET) as client:
            info = client.get_node_info(pb.GetNodeInfoRequest(), timeout=10)
        self.assertIn("QEMU emulator version", info.qemu_version)
        self.assertGreater(info.cpus, 0)


class MutualTls(unittest.TestCase):
    def test_a_cluster_certificate_gets_in(self):
        with kac.Client.tls(ENV["KVM_AGENT_TEST_TLS_TARGET"], ENV["KVM_AGENT_TEST_TLS_CERT"],
                            ENV["KVM_AGENT_TEST_TLS_KEY"], ENV["KVM_AGENT_TEST_TLS_CA"]) as client:
            info = client.get_node_info(pb.GetNodeInfoRequest(), timeout=10)
        self.assertIn("QEMU emulator version", info.qemu_version)

    def test_no_certificate_is_refused(self):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=open(ENV["KVM_AGENT_TEST_TLS_CA"], "rb").read())
        channel = grpc.secure_channel(ENV["KVM_AGENT_TEST_TLS_TARGET"], credentials)
        with kac.Client(channel) as client:
            with self.assertRaises(kac.AgentError) as refused:
                client.get_node_info(pb.GetNodeInfoRequest(), timeout=10)
        self.assertEqual(refused.exception.code, grpc.StatusCode.UNAVAILABLE)


class TypedErrors(unittest.TestCase):
    def setUp(self):
        self.client = kac.Client.unix(SOCKET)

    def tearDown(self):
        self.client.close()

    def test_unknown_instance_is_not_found(self):
        with self.assertRaises(kac.NotFound) as missing:
            self.client.get_instance(pb.GetInstanceRequest(name="nowhere"), timeout=10)
        self.assertEqual(missing.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("nowhere", missing.exception.message)

    def test_bad_spec_is_invalid_argument(self):
        spec = pb.InstanceSpec(name="bad spec", memory_mib=64, vcpus=1)
        with self.assertRaises(kac.InvalidArgument) as refused:
            self.client.start_instance(pb.StartInstanceRequest(spec=spec), timeout=10)
        self.assertIn("instance name", refused.exception.message)

    def test_unknown_method_is_an_attribute_error(self):
        with self.assertRaises(AttributeError):
            self.client.format_the_disk


class Lifecycle(unittest.TestCase):
    def test_start_watch_and_stop(self):
        with kac.Client.unix(SOCKET) as client:
            spec = pb.InstanceSpec(name="from-python", uuid=UUID, memory_mib=64, vcpus=1)
            started = client.start_instance(pb.StartInstanceRequest(spec=spec), timeout=30)
            self.assertEqual(started.state, pb.INSTANCE_STATE_RUNNING)
            self.assertEqual(started.uuid, UUID)
            with self.assertRaises(kac.AlreadyExists):
                client.start_instance(pb.StartInstanceRequest(spec=spec), timeout=30)

            stopped = client.stop_instance(
                pb.StopInstanceRequest(name="from-python", force=True), timeout=30
            )
            self.assertEqual(stopped.method, pb.STOP_METHOD_KILL)

            # The stream replays what happened, typed like unary replies.
            events = client.watch_events(
                pb.WatchEventsRequest(instance="from-python", after_sequence=0), timeout=5
            )
            states = []
            for event in events:
                if event.kind == pb.EVENT_KIND_STATE_CHANGED:
                    states.append(event.state)
                if pb.INSTANCE_STATE_STOPPED in states:
                    events.cancel()
                    break
            self.assertIn(pb.INSTANCE_STATE_RUNNING, states)
            self.assertIn(pb.INSTANCE_STATE_STOPPED, states)


if __name__ == "__main__":
    unittest.main()
