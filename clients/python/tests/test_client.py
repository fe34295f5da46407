"""The client against a running agent.

Run by the end-to-end suite (tests/tests/python_client.rs), which starts an
agent and passes its socket in KVM_AGENT_TEST_SOCKET, uuids for the
instances these tests start in KVM_AGENT_TEST_UUIDS (space-separated), and
for the TLS channel the agent's loopback address and an operator's
certificate in KVM_AGENT_TEST_TLS_TARGET, _CERT, _KEY and _CA.
"""

import os
import unittest

import grpc
import grpc.aio

import kvm_agent_client as kac
from kvm_agent_client import pb
from kvm_agent_client._stubs.kvmagent.v1 import agent_pb2_grpc

ENV = os.environ
SOCKET = ENV["KVM_AGENT_TEST_SOCKET"]
UUIDS = ENV["KVM_AGENT_TEST_UUIDS"].split()


class UnixSocketAuthority(unittest.TestCase):
    def test_stock_grpcio_channel_is_refused_by_the_agent(self):
        # grpcio >= 1.57 sends the percent-encoded socket path as :authority,
        # which the agent's HTTP/2 layer rejects. This is why the client
        # sets grpc.default_authority.
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
            info = client.get_node_info(timeout=10)
        self.assertIn("QEMU emulator version", info.qemu_version)
        self.assertGreater(info.cpus, 0)


class MutualTls(unittest.TestCase):
    def files(self):
        return ENV["KVM_AGENT_TEST_TLS_CERT"], ENV["KVM_AGENT_TEST_TLS_KEY"], ENV["KVM_AGENT_TEST_TLS_CA"]

    def test_a_cluster_certificate_gets_in_with_the_cli_address_forms(self):
        port = ENV["KVM_AGENT_TEST_TLS_TARGET"].rsplit(":", 1)[1]
        for address in (f"https://127.0.0.1:{port}", f"localhost:{port}"):
            with kac.Client.tls(address, *self.files()) as client:
                info = client.get_node_info(timeout=10)
            self.assertIn("QEMU emulator version", info.qemu_version, address)

    def test_from_env_reads_the_cli_variables(self):
        cert, key, ca = self.files()
        port = ENV["KVM_AGENT_TEST_TLS_TARGET"].rsplit(":", 1)[1]
        env = {
            "KVM_AGENT_ADDRESS": f"https://127.0.0.1:{port}",
            "KVM_AGENT_TLS_CERT": cert,
            "KVM_AGENT_TLS_KEY": key,
            "KVM_AGENT_TLS_CA": ca,
        }
        with kac.Client.from_env(env) as client:
            self.assertGreater(client.get_node_info(timeout=10).cpus, 0)
        with kac.Client.from_env({"KVM_AGENT_SOCKET": SOCKET}) as client:
            self.assertGreater(client.get_node_info(timeout=10).cpus, 0)
        with self.assertRaisesRegex(ValueError, "KVM_AGENT_TLS_KEY"):
            kac.Client.from_env({"KVM_AGENT_ADDRESS": env["KVM_AGENT_ADDRESS"], "KVM_AGENT_TLS_CERT": cert})

    def test_no_certificate_is_refused(self):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=open(ENV["KVM_AGENT_TEST_TLS_CA"], "rb").read())
        channel = grpc.secure_channel(ENV["KVM_AGENT_TEST_TLS_TARGET"], credentials)
        with kac.Client(channel) as client:
            with self.assertRaises(kac.Unavailable) as refused:
                client.get_node_info(timeout=10)
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)


class Requests(unittest.TestCase):
    """Refused before anything is sent: this client's socket doesn't exist,
    so only a check on this side can answer."""

    def setUp(self):
        self.client = kac.Client.unix("/nonexistent/agent.sock")

    def tearDown(self):
        self.client.close()

    def test_a_request_of_the_wrong_type_is_a_type_error(self):
        with self.assertRaisesRegex(TypeError, "takes a GetInstanceRequest, not a StopInstanceRequest"):
            self.client.get_instance(pb.StopInstanceRequest(name="web1"))

    def test_a_dict_is_a_type_error_that_says_what_to_pass(self):
        with self.assertRaisesRegex(TypeError, r"not a dict: pass its fields as keyword arguments"):
            self.client.get_instance({"name": "web1"})

    def test_unknown_keyword_arguments_are_a_type_error_listing_the_fields(self):
        with self.assertRaisesRegex(TypeError, "unknown keyword arguments nmae; the fields of GetInstanceRequest are: name"):
            self.client.get_instance(nmae="web1")
        with self.assertRaisesRegex(TypeError, "not both"):
            self.client.get_instance(pb.GetInstanceRequest(name="a"), name="b")

    def test_a_missing_socket_says_so(self):
        with self.assertRaisesRegex(kac.Unavailable, "socket /nonexistent/agent.sock does not exist"):
            self.client.get_node_info(timeout=5)

    def test_methods_are_listed_and_documented(self):
        self.assertIn("start_instance", dir(self.client))
        self.assertIn("Generates a fresh runtime from the spec", self.client.start_instance.__doc__)
        self.assertIn("powerdown_timeout_ms", self.client.reboot_instance.__doc__)
        self.assertTrue(callable(self.client.get_instance.future))
        self.assertTrue(callable(self.client.get_instance.with_call))
        with self.assertRaises(AttributeError):
            self.client.format_the_disk


class Errors(unittest.TestCase):
    def setUp(self):
        self.client = kac.Client.unix(SOCKET)

    def tearDown(self):
        self.client.close()

    def test_a_missing_instance_is_not_found_and_a_grpc_error(self):
        with self.assertRaises(grpc.RpcError) as missing:
            self.client.get_instance(name="nowhere", timeout=10)
        error = missing.exception
        self.assertIsInstance(error, kac.NotFound)
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("nowhere", error.details())
        self.assertNotIn("kvm-agent instance", error.details())
        self.assertIsInstance(error.__cause__, grpc.RpcError)

    def test_an_operation_refused_carries_its_request_id(self):
        spec = pb.InstanceSpec(name="bad spec", memory_mib=64)
        with self.assertRaises(kac.InvalidArgument) as refused:
            self.client.start_instance(spec=spec, timeout=10)
        self.assertIn("instance name", refused.exception.message)
        self.assertRegex(refused.exception.request_id or "", r"^[0-9a-f]{16}$")
        self.assertIn(refused.exception.request_id, str(refused.exception))

    def test_future_and_with_call_give_typed_errors_and_metadata(self):
        with self.assertRaises(kac.NotFound):
            self.client.get_instance.future(name="nowhere", timeout=10).result()
        info, call = self.client.get_node_info.with_call(timeout=10)
        self.assertGreater(info.cpus, 0)
        self.assertEqual(call.code(), grpc.StatusCode.OK)

    def test_a_socket_without_permission_is_a_permission_error(self):
        # Root may use any socket; a user without the right may not.
        os.seteuid(65534)
        try:
            with kac.Client.unix(SOCKET) as client:
                with self.assertRaises(PermissionError) as denied:
                    client.get_node_info(timeout=10)
        finally:
            os.seteuid(0)
        self.assertIsInstance(denied.exception, kac.PermissionDenied)
        self.assertIn("no permission to connect", str(denied.exception))
        # gRPC shares one subchannel among the channels to a socket: until
        # the refused one has connected again, after its backoff, the next
        # test's calls would fail at once with this test's error.
        with kac.Client.unix(SOCKET) as client:
            client.get_node_info(timeout=10, wait_for_ready=True)


class Streams(unittest.TestCase):
    def test_a_stream_cancelled_here_ends_quietly(self):
        with kac.Client.unix(SOCKET) as client:
            events = client.watch_events(timeout=30)
            self.assertTrue(events.cancel())
            self.assertEqual(list(events), [])
            self.assertEqual(events.code(), grpc.StatusCode.CANCELLED)
            self.assertIsInstance(events.details(), str)
            with client.watch_events(name="nowhere", timeout=30) as inside:
                pass
            self.assertEqual(list(inside), [])

    def test_a_stream_refused_raises_a_typed_error(self):
        with kac.Client.unix(SOCKET) as client:
            with self.assertRaises(kac.OutOfRange):
                list(client.watch_events(after_sequence=2**63, timeout=10))


class AsyncClient(unittest.IsolatedAsyncioTestCase):
    async def test_typed_errors_and_a_quiet_local_cancel(self):
        from kvm_agent_client.aio import AsyncClient

        async with AsyncClient.unix(SOCKET) as client:
            with self.assertRaises(kac.NotFound) as missing:
                await client.get_instance(name="nowhere", timeout=10)
            self.assertIsInstance(missing.exception, grpc.RpcError)
            self.assertIsInstance(missing.exception.__cause__, grpc.aio.AioRpcError)
            events = client.watch_events(timeout=30)
            self.assertTrue(events.cancel())
            self.assertEqual([e async for e in events], [])
            self.assertEqual(await events.code(), grpc.StatusCode.CANCELLED)


class Lifecycle(unittest.TestCase):
    def test_start_watch_and_stop(self):
        with kac.Client.unix(SOCKET) as client:
            spec = pb.InstanceSpec(name="from-python", uuid=UUIDS[0], memory_mib=64, vcpus=1)
            started = client.start_instance(pb.StartInstanceRequest(spec=spec), timeout=30)
            self.assertEqual(started.state, pb.INSTANCE_STATE_RUNNING)
            self.assertEqual(started.uuid, UUIDS[0])
            with self.assertRaises(kac.AlreadyExists):
                client.start_instance(spec=spec, timeout=30)

            # Immediate: no powerdown for a guest that ignores it.
            rebooted = client.reboot_instance(name="from-python", force=True, timeout=30)
            self.assertEqual(rebooted.state, pb.INSTANCE_STATE_RUNNING)

            stopped = client.stop_instance(name="from-python", force=True, timeout=30)
            self.assertEqual(stopped.method, pb.STOP_METHOD_KILL)

            # The stream replays what happened, typed like unary replies.
            states = []
            with client.watch_events(name="from-python", after_sequence=0, timeout=5) as events:
                for event in events:
                    self.assertEqual(event.instance, "from-python")
                    if event.kind == pb.EVENT_KIND_STATE_CHANGED:
                        states.append(event.state)
                    if event.kind == pb.EVENT_KIND_REBOOTED:
                        self.assertEqual(event.reboot, "soft")
                    if pb.INSTANCE_STATE_STOPPED in states:
                        break
            self.assertIn(pb.INSTANCE_STATE_RUNNING, states)
            self.assertIn(pb.INSTANCE_STATE_STOPPED, states)


if __name__ == "__main__":
    unittest.main()
