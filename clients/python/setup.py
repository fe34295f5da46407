"""Builds the client with its gRPC stubs generated from the agent's proto.

The stubs are generated at build time from proto/ in this repository (or
the directory KVM_AGENT_PROTO_DIR names), so they always match the agent
they were built with and none are committed.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = Path("kvmagent/v1/agent.proto")


def proto_dir() -> Path:
    configured = os.environ.get("KVM_AGENT_PROTO_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent.parent / "proto" / "proto"


class BuildWithStubs(build_py):
    """Generates agent_pb2.py and agent_pb2_grpc.py into the build tree."""

    def run(self):
        super().run()
        from grpc_tools import protoc

        source = proto_dir()
        if not (source / PROTO).is_file():
            raise SystemExit(
                f"{source / PROTO} is missing; build from the kvm-agent "
                "repository or set KVM_AGENT_PROTO_DIR"
            )
        out = Path(self.build_lib) / "kvm_agent_client" / "_stubs"
        out.mkdir(parents=True, exist_ok=True)
        include = Path(protoc.__file__).parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{source}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed on {source / PROTO}")
        for package in [out, out / "kvmagent", out / "kvmagent" / "v1"]:
            (package / "__init__.py").touch()
        # protoc writes an absolute import (`from kvmagent.v1 import ...`);
        # inside this package it must be relative.
        grpc_module = out / "kvmagent" / "v1" / "agent_pb2_grpc.py"
        text = grpc_module.read_text()
        absolute = "from kvmagent.v1 import agent_pb2"
        if absolute not in text:
            raise SystemExit(f"{grpc_module} does not import agent_pb2 as expected")
        grpc_module.write_text(text.replace(absolute, "from . import agent_pb2"))


setup(cmdclass={"build_py": BuildWithStubs})
