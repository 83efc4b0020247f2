"""A Flower deployment on loopback: one SuperLink and SuperNodes as separate processes.

Each party runs Flower's own binaries exactly as it would on its own machine: the SuperLink
(``flower-superlink``) with TLS and SuperNode authentication on an internal port, the Fleet
gateway (``fedrec gateway``, server/federation/fleet_gateway.py) on the port the nodes dial, each
node (``flower-supernode``) with the CA certificate, its own private key and its own ``data-dir``,
and the run submitted with ``flwr run`` over the Control API, straight to the SuperLink (the
operator's, on its machine). Everything lives under ``OUT/deploy`` (certificates,
keys, the SuperLink's database, a Flower home per party, so nothing touches ``~/.flwr``) and
``OUT/logs`` (one log per process). :meth:`LocalFederation.close` stops every process it
started, with everything they started in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from server.federation.credentials import VALID_DAYS, TlsFiles, write_node_key, write_tls
from shared.runs.config import RunConfig
from shared.runs.durable import atomic_write, make_private, private_dir

HOST = "127.0.0.1"
CONNECTION = "fedrec"  # the SuperLink connection's name in the Flower home's config.toml


class DeployError(RuntimeError):
    """A deployment step failed; the message says which, and where its log is."""


@dataclass
class Service:
    """One long-running process and its log."""

    name: str
    process: subprocess.Popen
    log: Path


def search_path() -> str:
    """``PATH`` with this interpreter's environment first, where Flower's executables are."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def binary(name: str) -> str:
    """A Flower executable, from this interpreter's environment first."""
    found = shutil.which(name, path=search_path())
    if found is None:
        raise DeployError(f"{name} not found: install Flower in this environment (flwr>=1.42)")
    return found


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def check_port(port: int) -> None:
    """Refuse a port something else already listens on."""
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError as error:
            raise DeployError(f"port {port} on {HOST} is not free ({error.strerror})") from None


def app_directory() -> Path:
    """The fedrec source tree (``flwr run`` builds the Flower App from it)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise DeployError(
            f"{root} is not the fedrec source tree (no pyproject.toml with [tool.flwr.app]): "
            "deploy from a checkout (pip install -e .)"
        )
    return root


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now (Linux /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def signal_tree(pids: list[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``, skipping those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _json_output(text: str) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed."""
    start = text.find("{")
    if start < 0:
        raise DeployError(f"flwr printed no JSON: {text.strip()[-300:]}")
    return json.loads(text[start:])


class LocalFederation:
    """A SuperLink and SuperNodes on loopback, TLS, node authentication and the Fleet gateway
    on unless ``secure`` is False; use as a context manager so that every process is stopped.

    ``port`` is the one the nodes dial: the gateway's, or the SuperLink's own when ``secure``
    is False; ``link_port`` is the SuperLink's."""

    def __init__(
        self, out: Path, secure: bool = True, port: int | None = None, cert_days: int = VALID_DAYS
    ):
        self.out = Path(out).resolve()
        self.home = self.out / "deploy"
        self.logs = self.out / "logs"
        self.secure = secure
        self.cert_days = cert_days
        if port is not None:
            check_port(port)
        self.port = port or free_port()
        self.link_port = self.port
        while secure and self.link_port == self.port:
            self.link_port = free_port()
        self.services: dict[str, Service] = {}
        self.node_ids: dict[str, int] = {}  # Flower's id of each registered node, by name
        self.tls: TlsFiles | None = None
        self.app = app_directory()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- processes ---------------------------------------------------------------------------

    def env(self, home: Path) -> dict[str, str]:
        """The environment of a Flower process whose Flower home is ``home``."""
        return {
            **os.environ,
            # the SuperLink starts Flower executables of its own by name: find this environment's
            "PATH": search_path(),
            "FLWR_HOME": str(home),
            # the fedrec environment is already complete, and there may be no internet
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_LOG_LEVEL": "INFO",  # each process's log is its file under OUT/logs
        }

    def _start(
        self, name: str, command: list[str], home: Path, env: dict[str, str] | None = None
    ) -> Service:
        private_dir(self.logs)
        private_dir(home)
        log = self.logs / f"{name}.log"
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "ab") as handle:
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=home,
                env={**self.env(home), **(env or {})},
                start_new_session=True,  # Ctrl-C reaches fedrec only, which stops everything
                umask=0o077,  # what Flower writes (the SuperLink's database, messages) is private
            )
        service = Service(name, process, log)
        self.services[name] = service
        return service

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
        """Stop a process and everything it started: ``sig`` first, SIGKILL after ``grace`` s."""
        service = self.services.pop(name)
        tree = process_tree(service.process.pid)
        signal_tree(tree, sig)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in tree):
            service.process.poll()
            time.sleep(0.1)
        signal_tree([p for p in tree if _alive(p)], signal.SIGKILL)
        service.process.wait()

    def close(self) -> None:
        """Stop the nodes, the gateway, then the SuperLink (each gracefully, then by force;
        the SuperLink waits for the gateway's connections to close)."""
        last = {"gateway": 1, "superlink": 2}
        for name in sorted(self.services, key=lambda n: last.get(n, 0)):
            self.kill(name, signal.SIGTERM)

    # --- the SuperLink -----------------------------------------------------------------------

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start (or restart, same port, database and certificates) the SuperLink, and the
        gateway in front of it if it is not running yet."""
        command = [binary("flower-superlink"), "--host", HOST, "--port", str(self.link_port)]
        database = private_dir(self.home) / "superlink.db"
        if database.exists():  # from a run before: created private by the umask above
            make_private(database)
        command += ["--database", str(database)]
        if self.secure:
            if self.tls is None:
                self.tls = write_tls(self.home / "certs", days=self.cert_days)
            command += ["--ssl-ca-certfile", str(self.tls.ca)]
            command += ["--ssl-certfile", str(self.tls.certificate)]
            command += ["--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth"]
        else:
            command += ["--insecure"]
        self._write_connection()
        self._wait_listening(self._start("superlink", command, self.home / "flwr"), timeout)
        if self.secure and "gateway" not in self.services:
            self.start_gateway(timeout)

    def start_gateway(self, timeout: float = 60.0) -> None:
        """Start the Fleet gateway on the nodes' port, in front of the SuperLink."""
        assert self.tls is not None, "the SuperLink's certificates come first"
        command = [sys.executable, "-m", "simulations.cli", "gateway"]
        command += ["--listen", f"{HOST}:{self.port}", "--superlink", f"{HOST}:{self.link_port}"]
        command += ["--ca", str(self.tls.ca), "--certfile", str(self.tls.certificate)]
        command += ["--keyfile", str(self.tls.key)]
        # this source tree's fedrec, wherever fedrec is installed
        path = os.pathsep.join(filter(None, [str(self.app), os.environ.get("PYTHONPATH")]))
        service = self._start("gateway", command, self.home / "gateway", {"PYTHONPATH": path})
        self._wait_listening(service, timeout)

    def _wait_listening(self, service: Service, timeout: float) -> None:
        """Wait until ``service`` listens on its port; DeployError if it exits or time runs
        out."""
        port = self.port if service.name == "gateway" else self.link_port
        deadline = time.time() + timeout
        while time.time() < deadline:
            if service.process.poll() is not None:
                raise DeployError(
                    f"{service.name} exited with code {service.process.returncode}; "
                    f"see {service.log}"
                )
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        raise DeployError(f"{service.name} did not listen on {HOST}:{port} in {timeout:g} s")

    def _write_connection(self) -> None:
        """The Flower home's config.toml: how ``flwr`` reaches this SuperLink (directly, on
        loopback: the Control API is not behind the gateway)."""
        connection: dict = {"address": f"{HOST}:{self.link_port}"}
        if self.secure:
            connection["root-certificates"] = str(self.home / "certs" / "ca.crt")
        else:
            connection["insecure"] = True
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        home = private_dir(self.home / "flwr")
        atomic_write(home / "config.toml", tomli_w.dumps(config).encode())

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run a ``flwr`` command against the SuperLink; returns its JSON output."""
        done = subprocess.run(
            [binary("flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            cwd=self.home,
            env=self.env(self.home / "flwr"),
            timeout=timeout,
        )
        if done.returncode != 0:
            raise DeployError(
                f"flwr {' '.join(args[:2])} failed ({done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-500:]}"
            )
        return _json_output(done.stdout)

    # --- the nodes ---------------------------------------------------------------------------

    def node_key(self, name: str, register: bool = True) -> Path:
        """A new key pair for node ``name``, its public key registered unless ``register`` is
        False (an intruder's); returns the private key."""
        private, public = write_node_key(self.home / "keys", name)
        if register:
            registered = self.flwr("supernode", "register", str(public), CONNECTION)
            self.node_ids[name] = int(registered["node-id"])
        return private

    def start_node(
        self,
        name: str,
        data_dir: Path,
        key: Path | None = None,
        tls: bool | None = None,
        policy: dict | None = None,
        trusted_entities: Path | None = None,
    ) -> Service:
        """A SuperNode reading only ``data_dir``, dialling ``port`` (the gateway), authenticated
        with the private ``key``, over TLS if the federation uses it (``tls`` False: a node that
        does not), with its own privacy ``policy`` (client/policy.py; default: a deployed
        node's); with ``trusted_entities``, it runs only apps those keys signed (Flower Hub's
        reviews: docs/deployment.md, "Trusted apps")."""
        command = [binary("flower-supernode"), "--superlink", f"{HOST}:{self.port}"]
        command += ["--port", str(free_port())]
        settings = {"data-dir": str(Path(data_dir).resolve()), **(policy or {})}
        command += ["--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())]
        if self.secure if tls is None else tls:
            command += ["--root-certificates", str(self.home / "certs" / "ca.crt")]
        else:
            command += ["--insecure", "--max-retries", "3"]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if trusted_entities is not None:
            command += ["--trusted-entities", str(trusted_entities)]
        return self._start(name, command, self.home / "nodes" / name)

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online."""
        nodes = self.flwr("supernode", "list", CONNECTION)["nodes"]
        return sum(node["status"] == "online" for node in nodes)

    def wait_for_nodes(self, count: int, timeout: float = 180.0) -> None:
        """Wait until ``count`` nodes are online; DeployError if a process exits or time runs
        out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for service in self.services.values():
                if service.process.poll() is not None:
                    raise DeployError(
                        f"{service.name} exited with code {service.process.returncode}; "
                        f"see {service.log}"
                    )
            if self.online_nodes() >= count:
                return
            time.sleep(2)
        raise DeployError(f"fewer than {count} nodes came online in {timeout:g} s")

    # --- runs --------------------------------------------------------------------------------

    def submit(self, config: RunConfig) -> int:
        """Start the fedrec ServerApp with ``config``; returns the run id."""
        settings = self.home / "run-config.toml"
        values = {k.replace("_", "-"): v for k, v in config.to_dict().items()}
        atomic_write(settings, tomli_w.dumps(values).encode())
        started = self.flwr("run", str(self.app), CONNECTION, "--run-config", str(settings))
        return int(started["run-id"])

    def status(self, run_id: int) -> str:
        """``pending``, ``starting``, ``running`` or ``finished:<completed|failed|stopped>``."""
        runs = self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"])

    def save_run_log(self, run_id: int) -> Path:
        """The ServerApp's log, from the SuperLink, into ``OUT/logs/serverapp-<run>.log``."""
        path = self.logs / f"serverapp-{run_id}.log"
        done = subprocess.run(
            [binary("flwr"), "log", str(run_id), CONNECTION, "--show"],
            capture_output=True,
            text=True,
            cwd=self.home,
            env=self.env(self.home / "flwr"),
            timeout=120,
        )
        atomic_write(path, (done.stdout + done.stderr).encode())
        return path
