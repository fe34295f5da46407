"""The newcomer scripts in examples/ against a running agent, and
mypy --strict on them: they pass, and a misspelled method or field fails.

Needs what test_client.py needs; mypy comes with the test virtualenv.
"""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = os.environ
UUIDS = ENV["KVM_AGENT_TEST_UUIDS"].split()


def run(args, env=None, timeout=180):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def mypy(*files):
    # A cache of its own per run: the stubs of another client build must
    # not stand in for this one's.
    with tempfile.TemporaryDirectory() as cache:
        return run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", cache, *map(str, files)])


class Newcomer(unittest.TestCase):
    def run_script(self, script, name, uuid):
        env = dict(ENV, KVM_AGENT_SOCKET=ENV["KVM_AGENT_TEST_SOCKET"])
        env.pop("KVM_AGENT_ADDRESS", None)
        done = run([sys.executable, str(EXAMPLES / script), name, uuid], env=env)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("added nic0", done.stdout)
        # The guest ignores ACPI, so the stop went past the powerdown.
        self.assertIn("stopped by STOP_METHOD_QUIT", done.stdout)

    def test_the_script_passes(self):
        self.run_script("newcomer.py", "newcomer", UUIDS[1])

    def test_its_async_twin_passes(self):
        self.run_script("newcomer_async.py", "newcomer-async", UUIDS[2])


class Typing(unittest.TestCase):
    def test_mypy_strict_passes_on_the_scripts(self):
        done = mypy(EXAMPLES / "newcomer.py", EXAMPLES / "newcomer_async.py")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_mypy_catches_a_misspelled_method_and_field(self):
        text = (EXAMPLES / "newcomer.py").read_text()
        text = text.replace("client.list_instances(", "client.list_instanses(")
        text = text.replace("watch_events(name=name", "watch_events(nmae=name")
        with tempfile.TemporaryDirectory() as tmp:
            bad = Path(tmp) / "misspelled.py"
            bad.write_text(text)
            done = mypy(bad)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn('"Client" has no attribute "list_instanses"', done.stdout)
        self.assertIn('Unexpected keyword argument "nmae"', done.stdout)


if __name__ == "__main__":
    unittest.main()
