"""CurveZMQ: key pairs, and turning encryption and client authentication on for a socket.

`paramserver keys DIR` writes `server.key` / `server.key_secret` and `client.key` /
`client.key_secret` (ZeroMQ certificate files); with `--shards K` one server pair per shard,
`server-shardI.key` / `server-shardI.key_secret`. The server loads its secret file; with `--auth
DIR` it admits only clients whose public key file is in DIR (a ZAP handler checks every
connection; a client with another key never gets a reply). Clients load their own secret file and
the server's public file. Without keys, traffic is plain TCP: keep the server on loopback or a
private network.

`paramserver keys DIR --admin NAME` also makes NAME an administrator: its public key goes into
DIR/clients (admitted) and DIR/admins (allowed to send SHUTDOWN under --auth). Secret key files are
written 0600, and existing key files are never overwritten unless asked (`force`).

Usage::

    make_keys("keys")                                   # server + client pairs
    server_curve(sock, "keys/server.key_secret", auth_dir="keys/clients", ctx=ctx)
    client_curve(sock, "keys/client.key_secret", "keys/server.key")
"""
from __future__ import annotations

import os
import re
import shutil

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def make_keys(folder: str, names: tuple[str, ...] = ("server", "client"), admins: tuple[str, ...] = (),
              force: bool = False) -> dict[str, tuple[str, str]]:
    """Create a key pair per name (and per admin name) in `folder`; returns {name: (public, secret file)}.

    Every name but a server's ("server", or "server-shardI" for shard I) is admitted (its public key is
    copied into folder/clients); admins are also
    copied into folder/admins. Secret files are 0600. Raises ConfigError, touching nothing, when a key
    file of one of these names exists and `force` is not set."""
    from common.config import ConfigError
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; install pyzmq from its wheels (they bundle libsodium)")
    names = tuple(dict.fromkeys(tuple(names) + tuple(admins)))
    for name in names:
        if not name or os.sep in name or name.startswith(".") or name in ("clients", "admins"):
            raise ConfigError(f"key name {name!r}: use a plain file name (letters, digits, -, _)")
    existing = [n for n in names
                if any(os.path.exists(os.path.join(folder, n + ext)) for ext in (".key", ".key_secret"))]
    if existing and not force:
        raise ConfigError(f"{folder}: key files for {', '.join(existing)} exist already; pass --force to replace "
                          "them (clients and servers holding the old keys will then be refused)")
    os.makedirs(folder, exist_ok=True)
    out = {}
    old_umask = os.umask(0o077)    # the secret files are never readable by others, not even for a moment
    try:
        for name in names:
            for ext in (".key", ".key_secret"):
                if os.path.exists(os.path.join(folder, name + ext)):
                    os.unlink(os.path.join(folder, name + ext))
            public, secret = zmq.auth.create_certificates(folder, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            out[name] = (public, secret)
    finally:
        os.umask(old_umask)
    for sub, members in (("clients", [n for n in names if not is_server_key(n)]), ("admins", list(admins))):
        if members:
            os.makedirs(os.path.join(folder, sub), exist_ok=True)   # clients: the --auth folder
        for name in members:
            shutil.copy(out[name][0], os.path.join(folder, sub, os.path.basename(out[name][0])))
    return out


def is_server_key(name: str) -> bool:
    """A server's key pair (never admitted as a client): "server", or "server-shardI" for shard I of a job."""
    return name == "server" or re.fullmatch(r"server-shard[0-9]+", name) is not None


def server_key_names(shards: int = 1) -> tuple[str, ...]:
    """The key names of a job's servers: "server" for one, "server-shard0".."server-shard{K-1}" for K shards."""
    return ("server",) if shards <= 1 else tuple(f"server-shard{i}" for i in range(shards))


def _load_secret(path: str) -> tuple[bytes, bytes]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"key file {path!r} does not exist (create keys with `paramserver keys DIR`)")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key; pass the *.key_secret file")
    return public, secret


def server_curve(sock: zmq.Socket, secret_file: str, auth_dir: str = "",
                 ctx: zmq.Context | None = None) -> ThreadAuthenticator | None:
    """Make `sock` (not yet bound) a CURVE server; with auth_dir, admit only the keys found there."""
    public, secret = _load_secret(secret_file)
    auth = None
    if auth_dir:
        if not os.path.isdir(auth_dir):
            raise FileNotFoundError(f"--auth folder {auth_dir!r} does not exist")
        auth = ThreadAuthenticator(ctx or zmq.Context.instance())
        auth.start()
        auth.configure_curve(domain="*", location=auth_dir)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def client_curve(sock: zmq.Socket, secret_file: str, server_public_file: str) -> None:
    """Make `sock` (not yet connected) a CURVE client of the server whose public key file is given."""
    public, secret = _load_secret(secret_file)
    if not os.path.exists(server_public_file):
        raise FileNotFoundError(f"server key file {server_public_file!r} does not exist")
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
