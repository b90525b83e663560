"""deploy/: real nginx and HAProxy, each in front of two ksw1fast instances of its own run
as the config documents (--proxy-protocol behind HAProxy, --trusted-proxy behind nginx).
The Kubernetes, systemd and Docker files are tests/test_deploy.py's.

The balancers run the very configs in deploy/, not look-alikes: deploy/nginx.conf and
deploy/haproxy.cfg stay concrete, usable as they are, and `render_*` below rewrites only
what differs on a test machine (instance addresses, listen ports, certificate, log and
socket paths), each rewrite asserting that it matched, so an edit of a deploy file that
breaks the rendering fails here instead of silently testing something else. Debian's
nginx and haproxy are installed by scripts/lb.sh; the system services are never used:
each balancer is our own foreground process with its files in a temp dir, on free
loopback ports, killed at teardown. Three loopback addresses tell the parties apart in
the instances' logs: the test client connects from CLIENT_SOURCE, nginx on to the
instances from NGINX_SOURCE, everything else from 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import trustme
import websockets

from ksw1fast import client as kclient
from ksw1fast.protocol.constants import Pkcs11Status
from ksw1fast.pkcs11.wire import FUNCTION_IDS as F, Reader, Writer, error_of

from helpers import GatewayProcess, RawClient, SoftHSM, free_port, http_get, make_softhsm

REPO = Path(__file__).resolve().parents[1]
# deploy/nginx.conf's rendering is shared with the benchmarks' TLS scenario; `benchmarks`
# is not packaged: appended, so `ksw1fast` stays the installed package
sys.path.append(str(REPO))
from benchmarks.baselines.nginx import binary, render_nginx, rewrite  # noqa: E402

pytestmark = pytest.mark.timeout(180)
# The balancers and SoftHSM are Debian packages, not in cibuildwheel's images: the tests
# that run them carry the marker those images deselect (`-m 'not softhsm'`).
needs_debian = pytest.mark.softhsm

DEPLOY = REPO / "deploy"
TOKEN = "lb-test-token-0123456789"
CONNECTIONS = 10  # per balancer: enough that both instances must get some
WAIT = 20.0       # seconds: the bound of every wait for a process or a state
IDLE_TIMEOUT = 2.0  # seconds: the balancers' idle timeout in the keepalive tests
CLIENT_SOURCE = "127.0.0.3"  # the browser, as the instances should see it
NGINX_SOURCE = "127.0.0.2"   # nginx's side of its connections to the instances
SPOOFED = "198.51.100.66"    # what the client's own forwarding headers claim to be
# how deploy/'s comments say to run the instances behind each balancer
AS_DEPLOYED = {"haproxy": ("--proxy-protocol",),
               "nginx": ("--trusted-proxy", f"{NGINX_SOURCE}/32")}


# --- helpers ------------------------------------------------------------------------------


class Proxy:
    """A balancer in the foreground; its output goes to a file shown when it fails."""

    def __init__(self, argv: list[str], log: Path, port: int) -> None:
        self.log = log
        self.port = port
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{argv[0]} did not listen on {port}:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Instance:
    proc: GatewayProcess
    port: int
    metrics_port: int

    def counter(self, name: str) -> float:
        status, text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.split(" ", 1)[0] == name)

    def connections(self) -> float:
        return self.counter("ksw1fast_connections_total")


def start_instances(*args: str, env: dict[str, str] | None = None) -> list[Instance]:
    instances: list[Instance] = []
    try:
        for _ in range(2):
            metrics_port = free_port()
            proc = GatewayProcess("--metrics-port", str(metrics_port), *args, env=env)
            port = int(proc.address.rsplit(":", 1)[1].split("/")[0])
            instances.append(Instance(proc, port, metrics_port))
        return instances
    except BaseException:
        stop_instances(instances)
        raise


def stop_instances(instances: list[Instance]) -> None:
    for instance in instances:
        instance.proc.stop()


# --- rendering deploy/ for this machine ---------------------------------------------------

def render_haproxy(tmp: Path, servers: list[Instance], port: int, pem: Path,
                   idle_timeout: str | None = None) -> list[str]:
    """deploy/haproxy.cfg with loopback addresses, each server's health check on its own
    metrics port, and the process-level lines (syslog, chroot, user) made local; the
    haproxy command line (-db: foreground, logs on stderr). `idle_timeout` replaces the
    1 h after which HAProxy cuts a silent tunnel."""
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    if idle_timeout is not None:
        # after the 101 only `timeout tunnel` counts: `timeout client` and `timeout server`
        # (30 s) no longer apply, `client-fin` only to a half-closed tunnel
        cfg = rewrite(cfg, r"^(\s*timeout tunnel )1h$", rf"\g<1>{idle_timeout}", 1)
    cfg = rewrite(cfg, r"^\s*log /dev/log .*$", "    log stderr format raw local0 info", 1)
    cfg = rewrite(cfg, r"^\s*(chroot|user|group|daemon)\b.*\n", "", 4)
    cfg = rewrite(cfg, r"^(\s*stats socket )\S+", rf"\g<1>{tmp}/admin.sock", 1)
    # HAProxy raises its fd limit to about 2 x maxconn, and fails where the hard limit
    # (20000 on some test machines) is lower
    cfg = rewrite(cfg, r"^(\s*maxconn )\d+", r"\g<1>1000", 1)
    cfg = rewrite(cfg, r"^(\s*bind )\S+( ssl crt )\S+", rf"\g<1>127.0.0.1:{port}\g<2>{pem}", 1)
    each = iter(servers)

    def server(m: re.Match) -> str:
        instance = next(each)
        return f"{m.group(1)}127.0.0.1:{instance.port}{m.group(2)}{instance.metrics_port}"

    cfg = rewrite(cfg, r"^(\s*server\s+\S+\s+)ksw1fast-\d+\.internal:8088"
                    r"(\s+send-proxy-v2\s+check port )9108", server, len(servers))
    (tmp / "haproxy.cfg").write_text(cfg)
    return [binary("haproxy"), "-db", "-f", f"{tmp}/haproxy.cfg"]


def haproxy_servers(sock: Path) -> dict[str, dict[str, str]]:
    """`show stat` on the admin socket: the backend's servers by name."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["pxname"] == "ksw1fast"
            and r["svname"] not in ("BACKEND", "FRONTEND")}


# --- a balancer in front of its instances -------------------------------------------------

@dataclass
class Balancer:
    kind: str  # nginx or haproxy
    port: int
    instances: list[Instance]

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"


@contextmanager
def balancer_in_front(kind: str, tmp: Path, tls: Tls, *args: str,
                      env: dict[str, str] | None = None, idle_timeout: str | None = None,
                      as_deployed: bool = True) -> Iterator[Balancer]:
    """`kind` running deploy/'s config (files in `tmp`) in front of two fresh instances
    with `args`, and with the flags AS_DEPLOYED names for `kind` unless `as_deployed` is
    false."""
    pair = start_instances(*(AS_DEPLOYED[kind] if as_deployed else ()), *args, env=env)
    proxy = None
    try:
        port = free_port()
        if kind == "nginx":
            argv = render_nginx(tmp, [i.port for i in pair], port, tls.chain, tls.key,
                                idle_timeout, bind=NGINX_SOURCE)
        else:
            argv = render_haproxy(tmp, pair, port, tls.bundle, idle_timeout)
        proxy = Proxy(argv, tmp / "stdout.log", port)
        yield Balancer(kind, port, pair)
    finally:
        if proxy is not None:
            proxy.stop()
        stop_instances(pair)


@asynccontextmanager
async def started(kind: str, tmp: Path, tls: Tls, *args: str,
                  **kwargs) -> AsyncIterator[Balancer]:
    """balancer_in_front for a test on the event loop, started and stopped in a thread:
    the loop also runs the test's echo server."""
    stack = ExitStack()
    running = await asyncio.to_thread(stack.enter_context,
                                      balancer_in_front(kind, tmp, tls, *args, **kwargs))
    try:
        yield running
    finally:
        await asyncio.to_thread(stack.close)


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def balancers_installed() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "lb.sh")], check=True,
                   stdin=subprocess.DEVNULL, timeout=600)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    """A token store for the instances behind the balancers."""
    return make_softhsm(tmp_path_factory.mktemp("lb-softhsm"), "lb-test")


@dataclass
class Tls:
    chain: Path
    key: Path
    bundle: Path          # key and chain in one file, as HAProxy's `crt` wants it
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tmp = tmp_path_factory.mktemp("lb-tls")
    paths = Tls(tmp / "chain.pem", tmp / "key.pem", tmp / "bundle.pem",
                ssl.create_default_context())
    paths.chain.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths.key))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths.bundle))
    ca.configure_trust(paths.client)
    return paths


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def balancer(request, balancers_installed, softhsm: SoftHSM, tls: Tls,
             tmp_path_factory) -> Iterator[Balancer]:
    """Each balancer with its own two instances, with tokens and PKCS#11 (SoftHSM) as in
    production."""
    token_file = tmp_path_factory.mktemp("lb-auth") / "tokens"
    token_file.write_text(TOKEN + "\n")
    with balancer_in_front(request.param, tmp_path_factory.mktemp(request.param), tls,
                           "--token-file", str(token_file), "--pkcs11-lib", softhsm.module,
                           env=softhsm.env) as running:
        yield running


# --- through the balancers ----------------------------------------------------------------

async def _pkcs11_random(c: kclient.KSW1Client) -> bytes:
    """GetSlotList, OpenSession, GenerateRandom, CloseSession on the instance's SoftHSM."""
    async def ok(fn: str, args: Writer) -> Reader:
        response = await c.pkcs11(F[fn], args.getvalue())
        assert response.status == Pkcs11Status.OK, (fn, error_of(response.status,
                                                                  response.body))
        return Reader(response.body)

    slots = (await ok("GetSlotList", Writer().bool(True))).list(Reader.u64)
    assert slots, "no token in the instance's SoftHSM"
    session = (await ok("OpenSession", Writer().u32(slots[0]).u32(0))).u32()
    data = (await ok("GenerateRandom", Writer().u32(session).u32(16))).bytes()
    await ok("CloseSession", Writer().u32(session))
    return data


async def _use(c: kclient.KSW1Client, echo_port: int, n: int) -> None:
    """TCP echo, a DNS lookup and PKCS#11 over one tunnel."""
    stream = await c.open_connection("127.0.0.1", echo_port)
    payload = os.urandom(64 * 1024) + b"client %d" % n
    stream.write(payload)
    assert await stream.readexactly(len(payload)) == payload
    await stream.close()
    assert "127.0.0.1" in await c.resolve("localhost", 4)
    assert len(await _pkcs11_random(c)) == 16


@needs_debian
async def test_tunnels_through_the_balancer_reach_both_instances(
        balancer: Balancer, tls, echo_port) -> None:
    before = [await asyncio.to_thread(i.connections) for i in balancer.instances]
    clients = []
    try:
        for _ in range(CONNECTIONS):  # all open at once: leastconn has to spread them
            clients.append(await kclient.connect(
                balancer.url, ssl_context=tls.client,
                extra_headers={"Authorization": f"Bearer {TOKEN}"}))
        await asyncio.wait_for(asyncio.gather(
            *(_use(c, echo_port, n) for n, c in enumerate(clients))), 90)
        after = [await asyncio.to_thread(i.connections) for i in balancer.instances]
    finally:
        for c in clients:
            await c.close()
    landed = [b - a for a, b in zip(before, after)]
    assert sum(landed) == CONNECTIONS, landed
    assert all(landed), f"{balancer.kind} sent every connection to one instance: {landed}"


@needs_debian
async def test_browser_auth_subprotocol_and_origin_pass_through(
        balancer: Balancer, tls) -> None:
    """What a browser sends (Origin, `auth-<token>` subprotocol) reaches ksw1fast, and
    ksw1fast's echo of the subprotocol comes back through the balancer."""
    url = balancer.url
    browser = {"ssl": tls.client, "origin": "http://localhost:5173", "open_timeout": 10}
    async with RawClient(url, subprotocols=[f"auth-{TOKEN}"], **browser) as raw:
        assert raw.ws.subprotocol == f"auth-{TOKEN}"
        await raw.hello()  # and KSW1 runs over it
    # refusals come from ksw1fast itself (neither balancer checks tokens or Origins):
    # proof that the headers arrive
    for kwargs, status in [({"subprotocols": ["auth-wrong"]}, 403),
                           ({}, 401),
                           ({"subprotocols": [f"auth-{TOKEN}"],
                             "origin": "https://evil.example"}, 403)]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, **{**browser, **kwargs})
        assert refused.value.response.status_code == status, kwargs


async def _peers_logged(balancer: Balancer, tls: Tls) -> tuple[list[str], int]:
    """One KSW1 session through `balancer` from CLIENT_SOURCE, whose own Forwarded and
    X-Forwarded-For headers claim SPOOFED: the `peer=` of every connection the instances
    logged as opened meanwhile, and the client's source port."""
    marks = [len(i.proc.log) for i in balancer.instances]

    def peers() -> list[str]:
        return [m.group(1) for i, mark in zip(balancer.instances, marks)
                for m in re.finditer(r"connection open peer=(\S+)", "".join(i.proc.log[mark:]))]

    sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=WAIT,
                                    source_address=(CLIENT_SOURCE, 0))
    client_port = sock.getsockname()[1]
    spoofing = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": SPOOFED,
                "Forwarded": f"for={SPOOFED}"}
    async with RawClient(balancer.url, sock=sock, ssl=tls.client,
                         additional_headers=spoofing, open_timeout=10) as raw:
        await raw.hello()  # answered: the instance has logged the connection by now
        deadline = time.monotonic() + WAIT  # the log reaches us through a pipe and a thread
        while not peers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return peers(), client_port


@needs_debian
async def test_the_instances_see_the_browser_not_the_balancer(
        balancer: Balancer, tls) -> None:
    """The instance logs the client's own address, not the balancer's and not what the
    client's headers claim: HAProxy's PROXY header gives address and port, nginx's
    X-Forwarded-For (from the one address the instances trust) the address."""
    peers, client_port = await _peers_logged(balancer, tls)
    want = f"{CLIENT_SOURCE}:{client_port}" if balancer.kind == "haproxy" else CLIENT_SOURCE
    assert peers == [want]


@needs_debian
async def test_an_instance_that_trusts_no_proxy_sees_nginx(
        balancers_installed, tls, tmp_path) -> None:
    """The control: without --trusted-proxy nginx's headers are ignored like anyone's, and
    the instance logs the address nginx connected from."""
    async with started("nginx", tmp_path, tls, as_deployed=False) as lb:
        peers, _ = await _peers_logged(lb, tls)
    assert len(peers) == 1 and re.fullmatch(rf"{re.escape(NGINX_SOURCE)}:\d+", peers[0]), peers


@needs_debian
async def test_haproxy_checks_readyz_and_routes_around_a_draining_instance(
        balancers_installed, tls, tmp_path, echo_port) -> None:
    """HAProxy's httpchk on the metrics port sees /readyz turn 503 when an instance
    drains: new tunnels go to the other one while the draining one's tunnel lives on."""
    async with started("haproxy", tmp_path, tls, "--drain-timeout", "30") as lb:
        pair = lb.instances

        async def states() -> list[tuple[str, str]]:
            servers = await asyncio.to_thread(haproxy_servers, tmp_path / "admin.sock")
            return [(s["status"], s["check_status"]) for s in servers.values()]

        async def wait_for_states(want: list[tuple[str, str]]) -> None:
            deadline = time.monotonic() + WAIT
            while (got := await states()) != want:
                assert time.monotonic() < deadline, f"HAProxy servers {got}, wanted {want}"
                await asyncio.sleep(0.2)

        # HTTP 200 from each /readyz: the checks on the metrics port send no PROXY header
        await wait_for_states([("UP", "L7OK")] * 2)

        before = [await asyncio.to_thread(i.connections) for i in pair]
        old = await kclient.connect(lb.url, ssl_context=tls.client)
        stream = await old.open_connection("127.0.0.1", echo_port)
        after = [await asyncio.to_thread(i.connections) for i in pair]
        draining = [b - a for a, b in zip(before, after)].index(1)
        other = pair[1 - draining]
        pair[draining].proc.proc.terminate()  # SIGTERM: drain
        states_want = [("UP", "L7OK")] * 2
        states_want[draining] = ("DOWN", "L7STS")  # /readyz answered 503
        await wait_for_states(states_want)

        before_other = await asyncio.to_thread(other.connections)
        fresh = [await kclient.connect(lb.url, ssl_context=tls.client) for _ in range(4)]
        for c in fresh:
            assert await asyncio.wait_for(c.ping(b"x"), 10) == b"x"
            await c.close()
        assert await asyncio.to_thread(other.connections) - before_other == 4
        stream.write(b"still here")  # the drained instance's tunnel still works
        assert await asyncio.wait_for(stream.readexactly(10), 10) == b"still here"
        await old.close()
        assert await asyncio.to_thread(pair[draining].proc.proc.wait, WAIT) == 0


# --- keepalive: the gateway's pings against the balancers' idle timeouts ------------------

async def _echo(stream: kclient.Stream, data: bytes) -> None:
    stream.write(data)
    assert await asyncio.wait_for(stream.readexactly(len(data)), 10) == data


@needs_debian
@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
async def test_pings_keep_an_idle_tunnel_through_the_balancer(
        balancers_installed, kind, tls, tmp_path, echo_port) -> None:
    """A tunnel silent for three times the balancer's idle timeout still echoes on the
    same stream: the gateway's pings every second (answered by the client's WebSocket
    library, as a browser does) are traffic the balancer sees."""
    async with started(kind, tmp_path, tls, "--idle-ping", "1",
                       idle_timeout=f"{IDLE_TIMEOUT:g}s") as lb:
        c = await kclient.connect(lb.url, ssl_context=tls.client)
        try:
            stream = await c.open_connection("127.0.0.1", echo_port)
            await _echo(stream, b"before")
            await asyncio.sleep(3 * IDLE_TIMEOUT)
            await _echo(stream, b"after")
        finally:
            await c.close()


@needs_debian
@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
async def test_without_pings_the_balancer_cuts_an_idle_tunnel(
        balancers_installed, kind, tls, tmp_path, echo_port) -> None:
    """The control of the test above: with `--idle-ping 0` the same balancer drops the
    silent tunnel once its idle timeout has passed, so that test does cross it."""
    async with started(kind, tmp_path, tls, "--idle-ping", "0",
                       idle_timeout=f"{IDLE_TIMEOUT:g}s") as lb:
        c = await kclient.connect(lb.url, ssl_context=tls.client)
        try:
            stream = await c.open_connection("127.0.0.1", echo_port)
            await _echo(stream, b"before")
            silent_since = time.monotonic()
            await asyncio.wait_for(asyncio.shield(c.disconnected), 3 * IDLE_TIMEOUT)
            # cut by the idle timer (nginx may have armed it up to 0.3 s before the echo)
            assert time.monotonic() - silent_since >= IDLE_TIMEOUT - 0.5
        finally:
            await c.close()


# --- the deploy files themselves -----------------------------------------------------------

def test_balancer_configs_keep_the_settings_tunnels_need() -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    for directive in ["proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $ksw1fast_connection_upgrade;",
                      "proxy_read_timeout 1h;", "proxy_send_timeout 1h;",
                      "proxy_buffering off;", "least_conn;",
                      "proxy_set_header Origin $http_origin;",
                      "proxy_set_header Sec-WebSocket-Protocol $http_sec_websocket_protocol;",
                      # a browser's own would be believed, ahead of X-Forwarded-For
                      'proxy_set_header Forwarded "";']:
        assert re.search(rf"^\s*{re.escape(directive)}", nginx, re.M), directive
    assert len(re.findall(r"^\s*server\s+\S+:8088", nginx, re.M)) >= 2
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    for directive in ["timeout tunnel 1h", "balance leastconn", "option httpchk GET /readyz",
                      "http-check expect status 200", "option redispatch"]:
        assert re.search(rf"^\s*{re.escape(directive)}", haproxy, re.M), directive
    assert len(re.findall(r"^\s*server .*:8088 send-proxy-v2 check port 9108", haproxy,
                          re.M)) >= 2
    directives = re.sub(r"#.*", "", haproxy)
    assert "shutdown-sessions" not in directives  # would cut drained tunnels
    assert "check-send-proxy" not in directives  # the metrics port speaks plain HTTP
