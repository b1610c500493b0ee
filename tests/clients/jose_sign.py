"""Plays the identity provider for tests/idp.rs, with Python `cryptography` (not the library densepush
verifies with): makes keys, signs JWS compact tokens (RFC 7515) by hand, makes a CA and a server certificate,
and serves a directory over HTTPS.

Modes:
  jose_sign.py            reads one JSON request per line on stdin, answers one JSON line on stdout:
    {"op": "keygen", "kind": "rsa"|"p256"|"p384"|"ed25519"}
        -> {"private_pem", "public_pem", "jwk"}            (jwk: public members only, no kid)
    {"op": "sign", "alg": "RS256", "header": {...}, "claims": {...},
     "private_pem": "..." | "secret": "...", "sign_as": "ES256" (optional), "none": false}
        -> {"token"}  header = {"alg": alg} + header; the signature is computed as `sign_as` (default alg),
                      so tests can forge a token whose alg does not match its key; "none": true leaves the
                      signature empty.
    {"op": "tls", "dir": "/path"}
        -> {"ca", "cert", "key"}  a CA and a certificate for 127.0.0.1 signed by it, as PEM files in dir.
  jose_sign.py serve-https DIR CERT KEY
        serves DIR over HTTPS on an ephemeral loopback port; prints "port N" once listening.
"""

import base64
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import NameOID


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_bytes(n: int, size: int = 0) -> bytes:
    return n.to_bytes(size or (n.bit_length() + 7) // 8, "big")


def keygen(kind: str) -> dict:
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        nums = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(int_bytes(nums.n)), "e": b64(int_bytes(nums.e))}
    elif kind in ("p256", "p384"):
        curve, crv, size = (ec.SECP256R1(), "P-256", 32) if kind == "p256" else (ec.SECP384R1(), "P-384", 48)
        key = ec.generate_private_key(curve)
        nums = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": crv, "x": b64(int_bytes(nums.x, size)), "y": b64(int_bytes(nums.y, size))}
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    else:
        raise ValueError(f"unknown key kind {kind}")
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return {"private_pem": private_pem, "public_pem": public_pem, "jwk": jwk}


HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def signature(alg: str, message: bytes, req: dict) -> bytes:
    if alg.startswith("HS"):
        mac = hmac.HMAC(req["secret"].encode(), HASHES[alg[2:]]())
        mac.update(message)
        return mac.finalize()
    key = serialization.load_pem_private_key(req["private_pem"].encode(), password=None)
    if alg.startswith("RS"):
        return key.sign(message, padding.PKCS1v15(), HASHES[alg[2:]]())
    if alg.startswith("PS"):
        # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
        digest = HASHES[alg[2:]]()
        return key.sign(message, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest)
    if alg.startswith("ES"):
        # RFC 7518 §3.4: R || S, each as long as the curve's order, not DER.
        der = key.sign(message, ec.ECDSA(HASHES[alg[2:]]()))
        r, s = utils.decode_dss_signature(der)
        size = (key.curve.key_size + 7) // 8
        return int_bytes(r, size) + int_bytes(s, size)
    if alg == "EdDSA":
        return key.sign(message)
    raise ValueError(f"cannot sign as {alg}")


def sign(req: dict) -> dict:
    header = {"alg": req["alg"], "typ": "JWT"}
    header.update(req.get("header") or {})
    message = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(req["claims"]).encode())).encode()
    sig = b"" if req.get("none") else signature(req.get("sign_as") or req["alg"], message, req)
    return {"token": message.decode() + "." + b64(sig)}


def tls(directory: str) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "densepush test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(
            leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


def serve_https(directory: str, cert: str, key: str) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "serve-https":
        serve_https(*sys.argv[2:])
        return
    ops = {"keygen": lambda r: keygen(r["kind"]), "sign": sign, "tls": lambda r: tls(r["dir"])}
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(ops[request["op"]](request)), flush=True)


if __name__ == "__main__":
    main()
