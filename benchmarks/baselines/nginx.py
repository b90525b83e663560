"""deploy/nginx.conf rendered for this machine, and nginx run from it in the foreground.

The very file operators install, not a look-alike: `render_nginx` rewrites only what
differs on a test machine (instance addresses, the listen port, certificate, log and temp
paths), and each rewrite must match (`rewrite`), so an edit of deploy/nginx.conf that
breaks it fails loudly.  tests/test_load_balancers.py runs it in front of two instances;
the benchmarks' TLS scenario in front of one gateway (both upstream lines pointing at it),
terminating TLS as a deployment does.  nginx comes from Debian (scripts/lb.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional, Union

from benchmarks.procs import REPO_ROOT, Service, free_port

DEPLOY = REPO_ROOT / "deploy"


def rewrite(text: str, pattern: str, repl: Union[str, Callable[[re.Match], str]],
            count: int) -> str:
    """re.sub that must match exactly `count` times: the deploy file still has that line."""
    new, hits = re.subn(pattern, repl, text, flags=re.M)
    if hits != count:
        raise AssertionError(f"{pattern!r} matched {hits} times, expected {count}")
    return new


def binary(name: str) -> str:
    """A Debian daemon's path (in /usr/sbin, which a non-root PATH may lack)."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise RuntimeError(f"{name} not found: scripts/lb.sh installs it")
    return found


def render_nginx(tmp: Path, upstreams: list[int], port: int, chain: Path, key: Path,
                 idle_timeout: Optional[str] = None, bind: Optional[str] = None) -> list[str]:
    """deploy/nginx.conf (an http-context file) with loopback addresses, wrapped in a main
    config whose pid, logs and temp files are in `tmp`; the nginx command line.
    `upstreams`: the two instances' ports; `idle_timeout` replaces the 1 h after which
    nginx cuts a silent tunnel; `bind`: the address nginx connects to instances from."""
    site = (DEPLOY / "nginx.conf").read_text()
    if idle_timeout is not None:
        site = rewrite(site, r"^(\s*proxy_(?:read|send)_timeout\s+)1h;",
                       rf"\g<1>{idle_timeout};", 2)
    ports = iter(upstreams)
    site = rewrite(site, r"^(\s*server\s+)ksw1fast-\d+\.internal:8088\b",
                   lambda m: f"{m.group(1)}127.0.0.1:{next(ports)}", len(upstreams))
    site = rewrite(site, r"^(\s*listen\s+)443 ssl;", rf"\g<1>127.0.0.1:{port} ssl;", 1)
    if bind is not None:
        site = rewrite(site, r"^(\s*)proxy_pass http://ksw1fast;\n",
                       rf"\g<0>\g<1>proxy_bind {bind};\n", 1)
    site = rewrite(site, r"^\s*listen\s+\[::\]:443 ssl;\n", "", 1)
    site = rewrite(site, r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{chain};", 1)
    site = rewrite(site, r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", 1)
    site = rewrite(site, r"/var/log/nginx/", f"{tmp}/", 1)
    (tmp / "ksw1fast.conf").write_text(site)
    # Debian's nginx starts workers as `nobody`, who cannot enter a 0700 temp dir
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\n{temp}    include {tmp}/ksw1fast.conf;\n}}\n")
    return [binary("nginx"), "-e", f"{tmp}/error.log", "-p", f"{tmp}/",
            "-c", f"{tmp}/nginx.conf", "-g", "daemon off;"]


def ensure_nginx() -> None:
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "lb.sh")], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class NginxTls(Service):
    """nginx from deploy/nginx.conf terminating TLS in front of the gateway on `upstream`
    (one worker process, as the rendering sets); `url` is its wss:// address."""

    def __init__(self, tmp: Path, upstream: int, chain: Path, key: Path,
                 echo: Optional[Callable[[str], None]] = None, **kwargs: Any) -> None:
        ensure_nginx()
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}/ws"
        argv = render_nginx(tmp, [upstream, upstream], self.port, chain, key)
        super().__init__("nginx", argv, echo=echo, **kwargs)
        self.wait_listening(self.port)
