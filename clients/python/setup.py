"""Builds the client, generating its code from the agent's proto.

Generated at build time, from proto/ in this repository (or the directory
KVM_AGENT_PROTO_DIR names), so they always match the agent they were built
with and none are committed:

  - the protobuf and gRPC modules (``_stubs``), with .pyi type stubs;
  - ``_api.py`` and ``_api.pyi``: one typed method per RPC for the
    synchronous and the asyncio client, documented with the proto's
    comments.

The package's version is the agent's (the workspace's Cargo.toml), and its
grpcio and protobuf minimums are the versions the generated code checks for
at import, read from that code.
"""

import os
import re
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = Path("kvmagent/v1/agent.proto")
SERVICE = "NodeAgent"
HERE = Path(__file__).resolve().parent


def proto_dir() -> Path:
    configured = os.environ.get("KVM_AGENT_PROTO_DIR")
    if configured:
        return Path(configured)
    return HERE.parent.parent / "proto" / "proto"


def agent_version() -> str:
    # proto_dir() is <repository>/proto/proto.
    cargo = proto_dir().resolve().parent.parent / "Cargo.toml"
    if not cargo.is_file():
        raise SystemExit(
            f"{cargo} is missing; build from the kvm-agent repository or set "
            "KVM_AGENT_PROTO_DIR to its proto/proto"
        )
    section = cargo.read_text().split("[workspace.package]", 1)[-1]
    found = re.search(r'^version\s*=\s*"([^"]+)"', section, re.M)
    if not found:
        raise SystemExit(f"{cargo} has no [workspace.package] version")
    return found.group(1)


def run_protoc(out: Path, descriptors: Path) -> None:
    from grpc_tools import protoc

    source = proto_dir()
    if not (source / PROTO).is_file():
        raise SystemExit(
            f"{source / PROTO} is missing; build from the kvm-agent "
            "repository or set KVM_AGENT_PROTO_DIR"
        )
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{source}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            "--include_source_info",
            f"--descriptor_set_out={descriptors}",
            str(PROTO),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed on {source / PROTO}")


def runtime_minimums() -> list:
    """grpcio and protobuf as new as the generated code says it needs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_protoc(out, out / "descriptors.bin")
        module = out / PROTO.parent
        grpc_text = (module / "agent_pb2_grpc.py").read_text()
        pb_text = (module / "agent_pb2.py").read_text()
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)
    pb_version = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
        r"(\d+),\s*(\d+),\s*(\d+),",
        pb_text,
    )
    if not grpc_version or not pb_version:
        raise SystemExit("the generated code no longer says which grpcio and protobuf it needs")
    return [
        f"grpcio>={grpc_version.group(1)}",
        f"protobuf>={'.'.join(pb_version.groups())}",
    ]


# ------------------------------------------------------------ docstrings


def comments(file_proto) -> dict:
    """Leading comments by descriptor path (a tuple), as plain text."""
    found = {}
    for location in file_proto.source_code_info.location:
        text = location.leading_comments.strip("\n")
        if text:
            lines = [line[1:] if line.startswith(" ") else line for line in text.split("\n")]
            found[tuple(location.path)] = "\n".join(lines).rstrip()
    return found


class Api:
    """The service, its messages and their comments, from a descriptor set."""

    def __init__(self, descriptor_set_path: Path):
        from google.protobuf import descriptor_pb2

        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(descriptor_set_path.read_bytes())
        (self.file,) = [f for f in fds.file if f.name == str(PROTO)]
        self.docs = comments(self.file)
        self.package = self.file.package
        self.messages = {m.name: (i, m) for i, m in enumerate(self.file.message_type)}
        self.enums = {e.name for e in self.file.enum_type}
        (self.service_index, self.service) = next(
            (i, s) for i, s in enumerate(self.file.service) if s.name == SERVICE
        )

    def local(self, type_name: str) -> str:
        return type_name.rsplit(".", 1)[-1]

    def method_doc(self, index: int, method) -> str:
        doc = self.docs.get((6, self.service_index, 2, index), f"{method.name}.")
        request = self.local(method.input_type)
        index_m, message = self.messages[request]
        lines = [doc, ""]
        if message.field:
            lines.append(f"Takes a {request}, or its fields as keyword arguments:")
            lines.append("")
            for fi, field in enumerate(message.field):
                field_doc = self.docs.get((4, index_m, 2, fi), "")
                lines.append(f"    {field.name} ({self.field_label(field)})")
                for line in field_doc.split("\n") if field_doc else []:
                    lines.append(f"        {line}")
        else:
            lines.append(f"Takes no arguments (or an empty {request}).")
        lines.append("")
        response = self.local(method.output_type)
        if method.server_streaming:
            lines.append(f"Returns a stream of {response} (iterate it; ``with`` it to end it).")
        else:
            lines.append(f"Returns a {response}.")
        lines.append("")
        lines.append("Also takes gRPC's ``timeout`` (seconds), ``metadata`` and ``wait_for_ready``.")
        lines.append("A refusal raises an AgentError subclass named after its gRPC code.")
        return "\n".join(lines)

    def field_label(self, field) -> str:
        from google.protobuf import descriptor_pb2 as d

        if field.type in (d.FieldDescriptorProto.TYPE_MESSAGE, d.FieldDescriptorProto.TYPE_ENUM):
            kind = self.local(field.type_name)
        else:
            kind = PY_SCALARS[field.type]
        if field.label == d.FieldDescriptorProto.LABEL_REPEATED:
            return f"list of {kind}"
        return kind

    def field_annotation(self, field) -> str:
        """The keyword argument's type in the .pyi, as the message's own
        constructor takes it."""
        from google.protobuf import descriptor_pb2 as d

        if field.type == d.FieldDescriptorProto.TYPE_MESSAGE:
            kind = f"pb.{self.local(field.type_name)}"
        elif field.type == d.FieldDescriptorProto.TYPE_ENUM:
            kind = f"Union[pb.{self.local(field.type_name)}, str, int]"
        else:
            kind = PY_SCALARS[field.type]
        if field.label == d.FieldDescriptorProto.LABEL_REPEATED:
            return f"Optional[Iterable[{kind}]]"
        return f"Optional[{kind}]"


PY_SCALARS = {
    1: "float", 2: "float",  # double, float
    3: "int", 4: "int", 5: "int", 6: "int", 7: "int",  # int64 .. fixed32
    8: "bool", 9: "str", 12: "bytes",
    13: "int", 15: "int", 16: "int", 17: "int", 18: "int",  # uint32 .. sint64
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def docstring(text: str, indent: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    body = "\n".join((indent + line) if line else "" for line in text.split("\n"))
    return f'{indent}"""{body.lstrip()}\n{indent}"""\n'


HEADER = '''"""The agent's methods, generated from {proto} when the package was built."""
# Generated by setup.py; do not edit.

from __future__ import annotations
'''


def generate_api(api: Api) -> tuple:
    """The text of _api.py and _api.pyi."""
    py = [HEADER.format(proto=PROTO), "from . import _calls", "from ._stubs.kvmagent.v1 import agent_pb2 as pb", ""]
    pyi = [
        HEADER.format(proto=PROTO),
        "from typing import Iterable, Optional, Sequence, Tuple, Union",
        "",
        "import grpc",
        "",
        "from . import _calls",
        "from ._stubs.kvmagent.v1 import agent_pb2 as pb",
        "",
        "_Metadata = Optional[Sequence[Tuple[str, Union[str, bytes]]]]",
        "",
    ]
    sync_props, async_props, sync_stub_props, async_stub_props = [], [], [], []
    for index, method in enumerate(api.service.method):
        name = snake(method.name)
        request = api.local(method.input_type)
        response = api.local(method.output_type)
        doc = api.method_doc(index, method)
        stream = method.server_streaming
        path = f"/{api.package}.{api.service.name}/{method.name}"
        for flavor, base in (("", "Stream" if stream else "Unary"), ("Async", "AsyncStream" if stream else "AsyncUnary")):
            cls = f"{flavor}{method.name}"
            py.append(f"\nclass {cls}(_calls.{base}):")
            py.append(docstring(doc, "    ").rstrip("\n"))
            py.append(f"    request_type = pb.{request}")
            py.append(f"    response_type = pb.{response}")
            py.append(f'    path = "{path}"')
            py.append(f'    python_name = "{name}"')
            pyi.extend(stub_class(api, cls, base, method, request, response, doc))
            props = async_props if flavor else sync_props
            stub_props = async_stub_props if flavor else sync_stub_props
            props.append(f"\n    @property\n    def {name}(self) -> {cls}:\n{docstring(doc, '        ')}        return self._method({cls})")
            stub_props.append(f"    @property\n    def {name}(self) -> {cls}: ...")
    for cls, props, stub_props in (
        ("Methods", sync_props, sync_stub_props),
        ("AsyncMethods", async_props, async_stub_props),
    ):
        doc = api.docs.get((6, api.service_index), api.service.name)
        py.append(f"\n\nclass {cls}(_calls.MethodTable):")
        py.append(docstring(f"The methods of {api.package}.{api.service.name}.\n\n{doc}", "    ").rstrip("\n"))
        py.extend(props)
        pyi.append(f"\nclass {cls}:")
        pyi.extend(stub_props)
    return "\n".join(py) + "\n", "\n".join(pyi) + "\n"


def stub_class(api, cls, base, method, request, response, doc) -> list:
    _, message = api.messages[request]
    fields = "".join(f", {f.name}: {api.field_annotation(f)} = ..." for f in message.field)
    params = (
        f"self, request: Optional[pb.{request}] = None, /, *, timeout: Optional[float] = None, "
        f"metadata: _Metadata = None, wait_for_ready: Optional[bool] = None{fields}"
    )
    # Standalone in the stub: only the signatures matter to a type checker.
    lines = [f"\nclass {cls}:"]
    if base == "Unary":
        lines.append(f"    def __call__({params}) -> pb.{response}: ...")
        lines.append(f"    def with_call({params}) -> Tuple[pb.{response}, grpc.Call]: ...")
        lines.append(f"    def future({params}) -> _calls.UnaryFuture[pb.{response}]: ...")
    elif base == "AsyncUnary":
        lines.append(f"    async def __call__({params}) -> pb.{response}: ...")
    elif base == "Stream":
        lines.append(f"    def __call__({params}) -> _calls.ResponseStream[pb.{response}]: ...")
    else:
        lines.append(f"    def __call__({params}) -> _calls.AsyncResponseStream[pb.{response}]: ...")
    return lines


# ----------------------------------------------------------------- build


class BuildWithGeneratedCode(build_py):
    """Generates the stubs and the methods into the build tree, or into
    the source tree for an editable install."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / "kvm_agent_client"
        if getattr(self, "editable_mode", False):
            package = HERE / "kvm_agent_client"
        generate_into(package)


def generate_into(package: Path) -> None:
    out = package / "_stubs"
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "descriptors.bin"
        run_protoc(out, descriptors)
        api = Api(descriptors)
    for sub in [out, out / "kvmagent", out / "kvmagent" / "v1"]:
        (sub / "__init__.py").touch()
    # protoc writes an absolute import (`from kvmagent.v1 import ...`);
    # inside this package it must be relative.
    grpc_module = out / "kvmagent" / "v1" / "agent_pb2_grpc.py"
    text = grpc_module.read_text()
    absolute = "from kvmagent.v1 import agent_pb2"
    if absolute not in text:
        raise SystemExit(f"{grpc_module} does not import agent_pb2 as expected")
    grpc_module.write_text(text.replace(absolute, "from . import agent_pb2"))
    py, pyi = generate_api(api)
    (package / "_api.py").write_text(py)
    (package / "_api.pyi").write_text(pyi)


setup(
    version=agent_version(),
    install_requires=runtime_minimums(),
    cmdclass={"build_py": BuildWithGeneratedCode},
)
