"""Pure logic of the volunteer experience: sizes and the memory budget (checked against what torch
really saves for backward), health verdicts, the initial-peers file, flag precedence, console lines."""
from __future__ import annotations

import io
import json
import os
import threading
import time
from dataclasses import replace

import pytest
import torch

from node.config import ConfigError, NodeConfig, Timeouts, load_node_config, parse_size, resolve_initial_peers
from node.console import NodeConsole, Progress, format_progress, format_role
from node.health import HEALTH_FILENAME, Health, HealthError, problems, read_health, write_health
from node.memory_budget import (MemoryBudgetError, check_budget, fit_slots, replica_memory, stage_memory)
from node.roles import RoleChoice
from protocol.keys import generate_private_key
from protocol.messages import Role
from protocol.runspec import make_spec
from trainer.model import ModelConfig, build_stage, stage_block_ranges

OWNER = generate_private_key()
PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWEwaVRMWTJXzW7v7aBDisXodqSoeBAev7bZW6jj4jpCQ3"


# ---- sizes and the memory budget -------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("1000", 1000), ("4GiB", 4 << 30), ("512m", 512 << 20), ("1.5G", 3 << 29),
                                        ("800MB", 800_000_000), (" 2 gib ", 2 << 30), ("64k", 65536)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "4 GiBs", "-1G", "0", "1e9", "G"])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match="--max-memory"):
        parse_size(text)


def saved_activation_bytes(fn, params) -> int:
    """Bytes of the tensors autograd keeps from a forward for its backward, parameters left out."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("preset, microbatch, seq", [("tiny", 4, 64), ("tiny", 8, 128), ("small", 1, 128)])
def test_the_activation_estimate_covers_what_torch_saves(preset, microbatch, seq):
    torch.manual_seed(0)
    spec = make_spec("pipeline", preset, OWNER, stages=4, microbatch_size=microbatch, seq_len=seq)
    cfg = ModelConfig.from_preset(preset)
    ranges = stage_block_ranges(cfg.n_layers, 4)
    tokens = torch.randint(0, cfg.vocab_size, (microbatch, seq))
    for stage in (0, 1):
        module = build_stage(cfg, stage, ranges[stage], seed=0)
        params = list(module.parameters())
        if stage == 0:
            measured = saved_activation_bytes(lambda: module(tokens, tokens), params)
        else:
            x = torch.randn(microbatch, seq, cfg.d_model, requires_grad=True)
            measured = saved_activation_bytes(lambda: module(x), params)
        need = stage_memory(spec, stage)
        assert need.params == sum(p.numel() for p in params)
        assert need.state_bytes == 16 * need.params
        assert measured <= need.slot_bytes <= 1.6 * measured, (stage, measured, need.slot_bytes)


def test_the_budget_caps_slots_and_refuses_what_cannot_fit():
    spec = make_spec("pipeline", "124m", OWNER, stages=4, memory=8, seq_len=256)
    need = stage_memory(spec, 1)
    assert fit_slots(need, 10 << 40, 8) == 8  # plenty: the run's pipeline.memory
    assert fit_slots(need, need.needed(3), 8) == 3
    assert fit_slots(need, need.needed(3) + need.slot_bytes - 1, 8) == 3
    with pytest.raises(MemoryBudgetError, match=r"stage 1: .* give at least") as refused:
        fit_slots(need, need.needed(1) - 1, 8)
    assert "GiB" in str(refused.value) or "MiB" in str(refused.value)
    stage0 = stage_memory(spec, 0)
    assert stage0.params > need.params  # the embedding lives on the data nodes
    # a spare is never given stage 0, role auto may be; --stage N is judged alone
    budget = need.needed(1)
    assert budget < stage0.needed(1)
    assert check_budget(spec, budget, None, spare=True) == 1
    with pytest.raises(MemoryBudgetError, match="stage 0"):
        check_budget(spec, budget, None)
    assert check_budget(spec, budget, 2) == 1


def test_a_zo_replica_is_judged_whole():
    spec = make_spec("zo", "small", OWNER)
    need = replica_memory(spec)
    assert need > 4 * ModelConfig.from_preset("small").param_count()
    assert check_budget(spec, need, None) is None
    with pytest.raises(MemoryBudgetError, match="small replica"):
        check_budget(spec, need - 1, None)


# ---- health ------------------------------------------------------------------------------------


def healthy(**changes) -> Health:
    base = Health(state="ONLINE", role="stage", stage=1, serving=True, peers=3, live_members=4, heartbeat_stored=True,
                  step=12, updated_at=1000.0, heartbeat_ttl_s=8.0, pid=os.getpid(), node_id="ab" * 32,
                  run_id="cd" * 16)
    return replace(base, **changes)


def test_health_verdicts():
    assert problems(healthy(), 1005.0, True) == []
    assert problems(healthy(role="spare", serving=False, stage=None), 1005.0, True) == []  # standing by
    lone_bootstrap = healthy(role="bootstrap", stage=None, peers=0, live_members=0)
    assert problems(lone_bootstrap, 1005.0, True) == []  # the first peer: nobody connected yet
    assert problems(lone_bootstrap, 1009.0, True) and problems(lone_bootstrap, 1005.0, False)
    cases = {
        "stale": (healthy(), 1009.0, True, "last heartbeat 9 s ago"),
        "dead": (healthy(), 1001.0, False, "not running"),
        "leaving": (healthy(state="LEAVING"), 1001.0, True, "state LEAVING"),
        "joining": (healthy(state="JOINING"), 1001.0, True, "state JOINING"),
        "alone": (healthy(peers=0), 1001.0, True, "not connected"),
        "unstored": (healthy(heartbeat_stored=False), 1001.0, True, "stored by no peer"),
        "idle": (healthy(serving=False), 1001.0, True, "not serving"),
    }
    for name, (record, now, alive, fragment) in cases.items():
        found = problems(record, now, alive)
        assert len(found) == 1 and fragment in found[0], (name, found)


def test_health_file_round_trip_and_refusals(tmp_path):
    write_health(tmp_path, healthy())
    assert read_health(tmp_path) == healthy()
    assert not [p for p in tmp_path.iterdir() if p.name != HEALTH_FILENAME]  # no temporary file left
    with pytest.raises(HealthError, match="no health file"):
        read_health(tmp_path / "nowhere")
    path = tmp_path / HEALTH_FILENAME
    for content, fragment in (("{", "not JSON"), ("[]", "JSON object"), ('{"state": "ONLINE"}', "lacks"),
                              (json.dumps({**healthy().to_json(), "peers": "3"}), "peers"),
                              (json.dumps({**healthy().to_json(), "serving": 1}), "serving"),
                              ("x" * 70000, "larger than")):
        path.write_text(content)
        with pytest.raises(HealthError, match=fragment):
            read_health(tmp_path)


# ---- configuration -------------------------------------------------------------------------------


def test_a_host_maddrs_flag_beats_the_images_port_variable():
    env = {"SWARMTRAIN_PORT": "31337"}
    assert load_node_config({}, env=env).resolved_host_maddrs() == ("/ip4/0.0.0.0/tcp/31337",)
    given = load_node_config({"host_maddrs": ("/ip4/127.0.0.1/tcp/0",)}, env=env)
    assert given.resolved_host_maddrs() == ("/ip4/127.0.0.1/tcp/0",)
    assert load_node_config({"port": 5}, env={"SWARMTRAIN_HOST_MADDRS": "/ip4/1.2.3.4/tcp/0"}).port == 5
    assert load_node_config({"max_memory": "2GiB"}, env={}).max_memory == "2GiB"
    with pytest.raises(ConfigError, match="SWARMTRAIN_MAX_MEMORY|--max-memory"):
        load_node_config({}, env={"SWARMTRAIN_MAX_MEMORY": "plenty"})


def test_initial_peers_file_is_waited_for_and_checked(tmp_path):
    path = tmp_path / "maddrs.txt"
    config = NodeConfig(initial_peers=(PEER,), initial_peers_file=str(path), timeouts=Timeouts(startup_s=20))
    other = PEER.replace("4001", "4002")
    writer = threading.Timer(0.5, lambda: path.write_text(f"# the bootstrap\n{PEER}\n\n{other}\n"))
    writer.start()
    started = time.monotonic()
    resolved = resolve_initial_peers(config, poll_s=0.05)
    assert 0.4 < time.monotonic() - started < 10
    assert resolved.initial_peers == (PEER, other)  # the flag's first, duplicates once
    for content, fragment in (("/ip4/1.2.3.4/tcp/1\n", "/p2p/"), ("\n# nothing\n", "no multiaddrs"),
                              ("x" * 70000, "larger than")):
        path.write_text(content)
        with pytest.raises(ConfigError, match=fragment):
            resolve_initial_peers(config)
    missing = replace(config, initial_peers_file=str(tmp_path / "never"), timeouts=Timeouts(startup_s=0.3))
    with pytest.raises(ConfigError, match="did not appear within"):
        resolve_initial_peers(missing, poll_s=0.05)


# ---- what the console prints ---------------------------------------------------------------------


def test_console_lines():
    role = RoleChoice(Role.STAGE, 2, "stage 2 has the fewest live replicas (0; by stage 0:1, 1:1, 2:0)")
    assert format_role(role) == "role: stage 2 — stage 2 has the fewest live replicas (0; by stage 0:1, 1:1, 2:0)"
    assert format_role(RoleChoice(Role.DATA, 0, "requested")) == "role: data node (stage 0) — requested"
    assert format_role(RoleChoice(Role.SPARE, None, "waits")) == "role: spare — waits"
    line = format_progress(Progress("ONLINE", "stage", 2, 12, 30, 3.21456, 5, 3 << 20))
    assert line == "progress: stage 2, step 12/30, loss 3.2146, 5 live nodes, 3.0 MiB sent, ONLINE"
    out = io.StringIO()
    console = NodeConsole(out, tty=False)
    console.addresses(["/ip4/127.0.0.1/tcp/1/p2p/x"])
    console.say(format_role(role))
    assert out.getvalue().splitlines() == ["this node's multiaddrs (others may use them as --initial-peers):",
                                           "  /ip4/127.0.0.1/tcp/1/p2p/x", format_role(role)]
