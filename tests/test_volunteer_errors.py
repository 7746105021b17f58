"""What a volunteer sees when a node cannot start: one line on stderr that says what to do, and an
exit code (2: a flag, setting or file the user gave is wrong; 1: the node could not do its work).
Unreachable initial peers and a port in use are in tests/test_cli.py (they start a DHT), unreadable
specs there too (`run show`), and malformed sizes in tests/test_volunteer_logic.py."""
from __future__ import annotations

import pytest
import torch

from protocol.keys import generate_private_key
from protocol.runspec import dumps_spec, make_spec
from tests.test_cli import assert_one_line_error, owner, swarmtrain  # noqa: F401 - owner is a fixture

EXIT_USAGE, EXIT_FAILURE = 2, 1


def gpu_case() -> tuple[str, tuple[str, ...]]:
    if not torch.cuda.is_available():
        return "cuda", ("--device cuda", "no CUDA GPU is visible", "--device cpu")
    count = torch.cuda.device_count()
    return f"cuda:{count}", (f"--device cuda:{count}", f"{count} GPU(s)")


def spec_variants(where, key) -> dict[str, str]:
    text = (where / "public.toml").read_text()
    unsigned = make_spec("pipeline", "tiny", key, name="unsigned")
    body = dumps_spec(unsigned).split("[owner]")[0]
    return {"unsigned.toml": body, "tampered.toml": text.replace("steps = 1000", "steps = 1001")}


@pytest.mark.parametrize(
    "case, args, code, fragments",
    [
        ("unsigned spec", ("--run", "unsigned.toml"), EXIT_FAILURE, ("not signed", "owner")),
        ("tampered spec", ("--run", "tampered.toml"), EXIT_FAILURE, ("signature does not verify", "changed")),
        ("private run, no token", ("--run", "PRIVATE"), EXIT_USAGE, ("private", "--token", "token issue")),
        ("gpu absent", ("--device", "GPU"), EXIT_FAILURE, ()),
        ("data dir not writable", ("--data-dir", "a-file/sub"), EXIT_USAGE, ("a-file/sub", "not writable")),
        ("peers file never written", ("--initial-peers-file", "none.txt"), EXIT_USAGE,
         ("none.txt", "did not appear within 1 s")),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else None,
)
def test_node_start_errors_are_one_line_with_an_exit_code(tmp_path, owner, case, args, code, fragments):  # noqa: F811
    where, key = owner
    for name, text in spec_variants(where, key).items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a-file").write_text("")
    gpu, gpu_fragments = gpu_case()
    args = tuple(str(where / "private.toml") if a == "PRIVATE" else gpu if a == "GPU" else a for a in args)
    base = ["node", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    if "--run" not in args:
        base += ["--run", str(where / "public.toml")]
    if "--data-dir" not in args:
        base += ["--data-dir", "d"]
    if "--device" not in args:
        base += ["--device", "cpu"]
    result = swarmtrain(tmp_path, *base, *args, env={"SWARMTRAIN_TIMEOUT_STARTUP_S": "1"}, timeout=120)
    assert_one_line_error(result, "node", *(fragments or gpu_fragments))
    assert result.returncode == code, (case, result.returncode, result.stderr)
    assert "multiaddrs" not in result.stdout  # it never joined a swarm


def test_health_without_a_node_is_one_line_and_exit_1(tmp_path):
    result = swarmtrain(tmp_path, "health", "--data-dir", "nowhere")
    assert_one_line_error(result, "health", "no health file", "nowhere")
    assert result.returncode == EXIT_FAILURE  # what Docker reads as unhealthy (2 is reserved there)
    result = swarmtrain(tmp_path, "health", env={"SWARMTRAIN_DATA_DIR": str(tmp_path / "from-env")})
    assert_one_line_error(result, "health", "from-env")


def test_max_memory_refuses_a_stage_before_joining(tmp_path):
    """A spare may be given any stage but 0; --stage judges that stage alone (124m: ~0.5 GiB of state)."""
    spec = make_spec("pipeline", "124m", generate_private_key(), name="big", stages=4, seq_len=256)
    (tmp_path / "big.toml").write_text(dumps_spec(spec))
    common = ["node", "--run", "big.toml", "--data-dir", "d", "--device", "cpu", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    result = swarmtrain(tmp_path, *common, "--role", "spare", "--max-memory", "600MiB", timeout=120)
    assert_one_line_error(result, "node", "stage 1", "AdamW state take 472.6 MiB", "give at least")
    assert result.returncode == EXIT_FAILURE
