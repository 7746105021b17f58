"""The `swarmtrain` command line as a user meets it: real subprocesses, one-line errors, exit codes."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.identity import KEY_FILENAME, read_private_key, write_private_key
from protocol.access import issue_token, token_from_text, token_to_text, verify_token
from protocol.keys import generate_private_key, public_key_bytes
from protocol.runspec import dumps_spec, load_spec, make_spec, run_id
from tests.harness import SWARMTRAIN, child_env

# A well-formed libp2p peer id that nobody in these tests runs.
NOBODY = "12D3KooWEwaVRMWTJXzW7v7aBDisXodqSoeBAev7bZW6jj4jpCQ3"
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _group(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def swarmtrain(cwd: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in its own session; whatever it started (DHT child, p2pd) is killed at the end."""
    started = time.monotonic()
    proc = subprocess.Popen([*SWARMTRAIN, *args], cwd=cwd, env=child_env(**(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        elapsed = time.monotonic() - started
        # the CLI must not leave daemons behind when it exits by itself
        deadline = time.monotonic() + 15
        while _group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group(proc.pid) == [], f"processes outlived `swarmtrain {' '.join(args)}`: {_group(proc.pid)}"
        return Result(proc.returncode, out, err, elapsed)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`swarmtrain {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def assert_one_line_error(result: Result, command: str, *fragments: str) -> str:
    """Exactly one error line, the last one on stderr, no traceback, non-zero exit."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    prefix = f"swarmtrain {command}: error: "
    assert lines and lines[-1].startswith(prefix), result.stderr
    assert sum(line.startswith("swarmtrain ") for line in lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> tuple[Path, object]:
    """An owner key file plus a public and a private run spec signed with it."""
    where = tmp_path_factory.mktemp("owner")
    key = generate_private_key()
    write_private_key(where / "owner.key", key)
    for access in ("public", "private"):
        spec = make_spec("pipeline", "tiny", key, access=access, name=f"{access}-run")
        (where / f"{access}.toml").write_text(dumps_spec(spec))
    return where, key


# ---- keygen, run, token ----------------------------------------------------------------------


def test_keygen_prints_public_key_and_writes_a_private_file(tmp_path):
    result = swarmtrain(tmp_path, "keygen", "--out", "me.key")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert HEX64.fullmatch(printed)
    assert stat.S_IMODE((tmp_path / "me.key").stat().st_mode) == 0o600
    assert public_key_bytes(read_private_key(tmp_path / "me.key")).hex() == printed


def test_keygen_refuses_to_overwrite(tmp_path):
    first = swarmtrain(tmp_path, "keygen", "--out", "me.key").stdout.strip()
    again = swarmtrain(tmp_path, "keygen", "--out", "me.key")
    assert_one_line_error(again, "keygen", "me.key", "already exists")
    assert public_key_bytes(read_private_key(tmp_path / "me.key")).hex() == first
    forced = swarmtrain(tmp_path, "keygen", "--out", "me.key", "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != first
    assert public_key_bytes(read_private_key(tmp_path / "me.key")).hex() == forced.stdout.strip()


def test_run_init_writes_a_spec_that_run_show_verifies(tmp_path, owner):
    where, key = owner
    made = swarmtrain(tmp_path, "run", "init", "--mode", "pipeline", "--key", str(where / "owner.key"),
                      "--out", "run.toml", "--name", "cli-test", "--stages", "3")
    assert made.returncode == 0, made.stderr
    spec = load_spec(tmp_path / "run.toml")
    assert (spec.run.name, spec.pipeline.stages, spec.owner.public_key) == ("cli-test", 3, public_key_bytes(key).hex())
    rid = run_id(spec).hex()
    assert rid in made.stdout
    shown = swarmtrain(tmp_path, "run", "show", "run.toml")
    assert shown.returncode == 0, shown.stderr
    assert rid in shown.stdout and "pipeline" in shown.stdout
    again = swarmtrain(tmp_path, "run", "init", "--mode", "zo", "--key", str(where / "owner.key"), "--out", "run.toml")
    assert_one_line_error(again, "run init", "already exists", "--force")
    assert load_spec(tmp_path / "run.toml").run.mode == "pipeline"


def test_tampered_spec_is_rejected(tmp_path, owner):
    where, _ = owner
    text = (where / "public.toml").read_text()
    assert "steps = 1000" in text
    (tmp_path / "run.toml").write_text(text.replace("steps = 1000", "steps = 1001"))
    assert_one_line_error(swarmtrain(tmp_path, "run", "show", "run.toml"), "run show", "signature")


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ("run.toml", "does not exist")),
        ("[train]\nbogus = 1\n", ("train.bogus", "unknown key")),
        ("[run\nname = ", ("run.toml", "not valid TOML")),
        ("[run]\nmode = 3\n", ("run.mode", "expected str")),
    ],
    ids=["missing", "unknown-key", "bad-toml", "bad-type"],
)
def test_unreadable_specs_are_one_line_errors(tmp_path, content, fragments):
    if content is not None:
        (tmp_path / "run.toml").write_text(content)
    assert_one_line_error(swarmtrain(tmp_path, "run", "show", "run.toml"), "run show", *fragments)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--out", "."), ("is a directory",)),
        (("--out", "x.toml", "--preset", "huge"), ("unknown model preset 'huge'", "tiny")),
        (("--out", "x.toml", "--stages", "6"), ("4 blocks", "6 stages")),
        (("--out", "x.toml", "--key", "missing.key"), ("missing.key", "keygen")),
    ],
    ids=["out-is-dir", "unknown-preset", "too-many-stages", "missing-key"],
)
def test_run_init_refuses_specs_no_node_could_serve(tmp_path, owner, args, fragments):
    where, _ = owner
    result = swarmtrain(tmp_path, "run", "init", "--mode", "pipeline", "--key", str(where / "owner.key"), *args)
    assert_one_line_error(result, "run init", *fragments)
    assert not (tmp_path / "x.toml").exists()


def test_token_issue_prints_a_token_nodes_accept(tmp_path, owner):
    where, key = owner
    node = generate_private_key()
    node_hex = public_key_bytes(node).hex()
    result = swarmtrain(tmp_path, "token", "issue", "--run", str(where / "private.toml"),
                        "--key", str(where / "owner.key"), "--node", node_hex, "--valid-hours", "2")
    assert result.returncode == 0, result.stderr
    spec = load_spec(where / "private.toml")
    token = verify_token(token_from_text(result.stdout.strip()), owner_public=public_key_bytes(key),
                         run_id=run_id(spec), node_public=public_key_bytes(node), now=time.time())
    assert 1.9 * 3600 < token.expires_at - time.time() <= 2 * 3600


def test_token_issue_needs_the_owner_key_and_a_node_key(tmp_path, owner):
    where, _ = owner
    write_private_key(tmp_path / "other.key", generate_private_key())
    node_hex = public_key_bytes(generate_private_key()).hex()
    spec = str(where / "private.toml")
    result = swarmtrain(tmp_path, "token", "issue", "--run", spec, "--key", "other.key", "--node", node_hex)
    assert_one_line_error(result, "token issue", "other.key", "not the owner key")
    assert result.stdout == ""
    result = swarmtrain(tmp_path, "token", "issue", "--run", spec, "--key", str(where / "owner.key"), "--node", "abc")
    assert_one_line_error(result, "token issue", "--node", "64")


# ---- node: errors a user can make before anything touches the network -------------------------


def test_node_without_run_spec(tmp_path):
    result = swarmtrain(tmp_path, "node", "--data-dir", "d")
    line = assert_one_line_error(result, "node", "--run", "run init")
    assert result.stderr.strip() == line  # nothing else was printed
    assert not (tmp_path / "d").exists()


def test_private_run_without_token_tells_the_node_id(tmp_path, owner):
    where, _ = owner
    result = swarmtrain(tmp_path, "node", "--run", str(where / "private.toml"), "--data-dir", "d", "--device", "cpu")
    line = assert_one_line_error(result, "node", "private", "--token", "token issue")
    node_hex = public_key_bytes(read_private_key(tmp_path / "d" / KEY_FILENAME)).hex()
    assert node_hex in line  # what the owner needs to issue the token


def test_json_logs_stay_json_up_to_the_error(tmp_path, owner):
    where, _ = owner
    result = swarmtrain(tmp_path, "node", "--run", str(where / "private.toml"), "--data-dir", "d", "--device", "cpu",
                        "--log-format", "json")
    assert_one_line_error(result, "node", "private")
    entries = [json.loads(line) for line in result.stderr.strip().splitlines()[:-1]]
    assert any(e["message"].startswith("node id ") and e["level"] == "INFO" for e in entries), entries


def test_status_needs_initial_peers(tmp_path):
    assert_one_line_error(swarmtrain(tmp_path, "status", "--json"), "status", "--initial-peers")


def test_private_run_with_someone_elses_token(tmp_path, owner):
    where, key = owner
    spec = load_spec(where / "private.toml")
    token = token_to_text(issue_token(key, run_id(spec), public_key_bytes(generate_private_key()), time.time() + 600))
    result = swarmtrain(tmp_path, "node", "--run", str(where / "private.toml"), "--data-dir", "d", "--device", "cpu",
                        "--token", token)
    assert_one_line_error(result, "node", "join token was issued to node")


@pytest.mark.parametrize(
    "args, env, fragments",
    [
        (("--device", "cuda:99"), {}, ("--device cuda:99",)),  # no such GPU, with or without CUDA
        (("--data-dir", "a-file/sub"), {}, ("a-file/sub", "not writable", "--data-dir")),
        (("--port", "70000"), {}, ("--port 70000", "0..65535")),
        ((), {"SWARMTRAIN_PORT": "eighty"}, ("SWARMTRAIN_PORT", "integer")),
        ((), {"SWARMTRAIN_TIMEOUT_RPC_S": "nan"}, ("SWARMTRAIN_TIMEOUT_RPC_S",)),
        (("--log-level", "LOUD"), {}, ("--log-level", "LOUD")),
        (("--stage", "7"), {}, ("stage 7 does not exist", "0..3")),
        (("--role", "stage", "--stage", "0"), {}, ("stage 0 is the data role",)),
        (("--token", "not base64!"), {}, ("join token",)),
        (("--config", "missing.toml"), {}, ("missing.toml", "does not exist")),
    ],
    ids=["cuda", "data-dir", "port", "env-port", "env-timeout", "log-level", "stage", "role", "token", "config"],
)
def test_node_refuses_bad_settings_before_joining(tmp_path, owner, args, env, fragments):
    (tmp_path / "a-file").write_text("")
    where, _ = owner
    base = ["node", "--run", str(where / "public.toml"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    if "--data-dir" not in args:
        base += ["--data-dir", "d"]
    result = swarmtrain(tmp_path, *base, *args, env=env)
    assert_one_line_error(result, "node", *fragments)
    assert "multiaddrs" not in result.stdout  # it never started a swarm


# ---- node: errors only the network can tell ----------------------------------------------------


def test_node_with_unreachable_initial_peer_fails_fast(tmp_path, owner):
    where, _ = owner
    peer = f"/ip4/127.0.0.1/tcp/1/p2p/{NOBODY}"
    result = swarmtrain(tmp_path, "node", "--run", str(where / "public.toml"), "--data-dir", "d", "--device", "cpu",
                        "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", peer, timeout=120)
    assert_one_line_error(result, "node", "cannot reach any initial peer", "--initial-peers")
    assert result.returncode == 1


def test_node_on_a_port_in_use(tmp_path, owner):
    where, _ = owner
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = swarmtrain(tmp_path, "node", "--run", str(where / "public.toml"), "--data-dir", "d",
                            "--device", "cpu", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", timeout=120)
    assert_one_line_error(result, "node", "already in use", str(port))
    assert result.returncode == 1


# ---- help, usage, demo -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, flags",
    [
        ((), ("keygen", "run", "token", "bootstrap", "node", "status", "demo")),
        (("keygen",), ("--out", "--force")),
        (("run",), ("init", "show")),
        (("run", "init"), ("--mode", "--preset", "--key", "--out", "--access", "--stages")),
        (("run", "show"), ("spec",)),
        (("token",), ("issue",)),
        (("token", "issue"), ("--run", "--key", "--node", "--valid-hours")),
        (("bootstrap",), ("--initial-peers", "--host-maddrs", "--port", "--data-dir", "SWARMTRAIN_")),
        (("node",), ("--run", "--initial-peers", "--data-dir", "--role", "--stage", "--device", "--token",
                     "--config", "SWARMTRAIN_")),
        (("status",), ("--initial-peers", "--run", "--json")),
        (("demo",), ("--steps", "--preset")),
    ],
    ids=["swarmtrain", "keygen", "run", "run-init", "run-show", "token", "token-issue", "bootstrap", "node", "status",
         "demo"],
)
def test_help(tmp_path, command, flags):
    result = swarmtrain(tmp_path, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(('swarmtrain', *command))}")
    for flag in flags:
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    "args",
    [(), ("fly",), ("keygen",), ("run", "init", "--key", "k", "--out", "o"), ("run", "init", "--mode", "rocket"),
     ("node", "--port", "abc"), ("node", "--role", "boss"), ("token", "issue", "--run", "r.toml")],
)
def test_bad_arguments_are_usage_errors(tmp_path, args):
    result = swarmtrain(tmp_path, *args)
    assert result.returncode == 2
    assert "usage: swarmtrain" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_needs_positive_steps(tmp_path):
    assert_one_line_error(swarmtrain(tmp_path, "demo", "--steps", "0"), "demo", "--steps")
    assert_one_line_error(swarmtrain(tmp_path, "demo", "--mode", "single", "--steps", "1", "--preset", "huge"), "demo",
                          "preset 'huge'")
    assert_one_line_error(swarmtrain(tmp_path, "demo", "--stages", "9"), "demo", "--stages")
    assert_one_line_error(swarmtrain(tmp_path, "demo", "--nodes", "2"), "demo", "--nodes")
    assert_one_line_error(swarmtrain(tmp_path, "demo", "--iterations", "0"), "demo", "--iterations")
