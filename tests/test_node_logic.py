"""The node's pure logic: configuration precedence, membership states and events, role choice, identity files."""
from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from node.config import ConfigError, NodeConfig, Timeouts, load_node_config
from node.identity import KEY_FILENAME, IdentityError, load_or_create_identity, read_private_key, write_private_key
from node.membership import DEAD, count_by_stage, derive_members, derive_state, diff_events
from node.roles import RoleError, choose_role
from protocol.keys import generate_private_key, private_key_to_pem, public_key_bytes
from protocol.messages import Heartbeat, NodeAnnouncement, NodeState, Role

TTL = 8.0
NOW = 1_000_000.0


# ---- configuration ---------------------------------------------------------------------------


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source():
    config = load_node_config({}, env={})
    assert config == NodeConfig()
    assert config.resolved_host_maddrs() == ("/ip4/0.0.0.0/tcp/0",)


def test_flags_beat_env_beat_toml_beat_defaults(tmp_path):
    path = write_toml(tmp_path, """
[node]
public_name = "from-toml"
device = "cpu"
log_format = "json"
role = "data"
""")
    env = {"SWARMTRAIN_PUBLIC_NAME": "from-env", "SWARMTRAIN_DEVICE": "cuda:0"}
    config = load_node_config({"public_name": "from-flag"}, env=env, config_path=path)
    assert config.public_name == "from-flag"  # flag > env > TOML
    assert config.device == "cuda:0"  # env > TOML
    assert config.log_format == "json"  # TOML > default
    assert config.role == "data"
    assert config.data_dir == NodeConfig().data_dir  # untouched: the default
    # a flag the user did not give (None) does not hide the lower sources
    assert load_node_config({"public_name": None}, env=env, config_path=path).public_name == "from-env"


def test_tuple_fields_from_every_source(tmp_path):
    path = write_toml(tmp_path, '[node]\ninitial_peers = ["/ip4/1.2.3.4/tcp/1/p2p/A"]\nhost_maddrs = "/ip4/127.0.0.1/tcp/5"\n')
    assert load_node_config({}, env={}, config_path=path).initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/A",)
    assert load_node_config({}, env={}, config_path=path).host_maddrs == ("/ip4/127.0.0.1/tcp/5",)
    env = {"SWARMTRAIN_INITIAL_PEERS": " /ip4/10.0.0.1/tcp/1/p2p/B , /ip4/10.0.0.2/tcp/2/p2p/C ,"}
    config = load_node_config({}, env=env, config_path=path)
    assert config.initial_peers == ("/ip4/10.0.0.1/tcp/1/p2p/B", "/ip4/10.0.0.2/tcp/2/p2p/C")
    flagged = load_node_config({"initial_peers": ("/ip4/9.9.9.9/tcp/9/p2p/D",)}, env=env, config_path=path)
    assert flagged.initial_peers == ("/ip4/9.9.9.9/tcp/9/p2p/D",)


def test_timeouts_from_env_and_toml(tmp_path):
    path = write_toml(tmp_path, "[node]\n[node.timeouts]\nrpc_s = 11\ndht_s = 12.5\n")
    config = load_node_config({}, env={"SWARMTRAIN_TIMEOUT_RPC_S": "60"}, config_path=path)
    assert config.timeouts.rpc_s == 60.0  # env beats TOML
    assert config.timeouts.dht_s == 12.5
    assert config.timeouts.startup_s == Timeouts().startup_s
    assert load_node_config({}, env={"SWARMTRAIN_TIMEOUT_RPC_FAILURES_FOR_DEAD": "5"}).timeouts.rpc_failures_for_dead == 5


def test_port_and_bools_from_env():
    config = load_node_config({}, env={"SWARMTRAIN_PORT": "31337", "SWARMTRAIN_CLIENT_MODE": "yes"})
    assert config.port == 31337 and config.client_mode is True
    assert config.resolved_host_maddrs() == ("/ip4/0.0.0.0/tcp/31337",)
    assert load_node_config({}, env={"SWARMTRAIN_CLIENT_MODE": "off"}).client_mode is False


def test_a_toml_file_without_a_node_table_is_read_whole(tmp_path):
    path = write_toml(tmp_path, 'public_name = "flat"\n')
    assert load_node_config({}, env={}, config_path=path).public_name == "flat"


@pytest.mark.parametrize(
    "toml, named",
    [
        ("[node]\npublic_nam = 'typo'\n", "public_nam"),
        ("[node]\nport = 'eighty'\n", "port"),
        ("[node]\nport = 80.5\n", "port"),
        ("[node]\nport = 70000\n", "port"),
        ("[node]\nclient_mode = 'maybe'\n", "client_mode"),
        ("[node]\npublic_name = 7\n", "public_name"),
        ("[node]\ninitial_peers = [1, 2]\n", "initial_peers"),
        ("[node]\nstage = true\n", "stage"),
        ("[node]\ntimeouts = 5\n", "timeouts"),
        ("[node.timeouts]\nrpc_s = 'slow'\n", "rpc_s"),
        ("[node.timeouts]\nbogus_s = 1\n", "bogus_s"),
        ("[node.timeouts]\nrpc_s = -1\n", "rpc_s"),
        ("[node.timeouts]\nrpc_failures_for_dead = 0\n", "rpc_failures_for_dead"),
        ("[node]\nlog_level = 'LOUD'\n", "log-level"),
        ("[node]\nrole = 'boss'\n", "role"),
    ],
)
def test_bad_toml_values_name_the_setting(tmp_path, toml, named):
    path = write_toml(tmp_path, toml)
    with pytest.raises(ConfigError, match=named):
        load_node_config({}, env={}, config_path=path)


@pytest.mark.parametrize(
    "env, named",
    [
        ({"SWARMTRAIN_PORT": "abc"}, "SWARMTRAIN_PORT"),
        ({"SWARMTRAIN_PORT": "-1"}, "port"),
        ({"SWARMTRAIN_STAGE": "1.5"}, "SWARMTRAIN_STAGE"),
        ({"SWARMTRAIN_CLIENT_MODE": "perhaps"}, "SWARMTRAIN_CLIENT_MODE"),
        ({"SWARMTRAIN_TIMEOUT_RPC_S": "soon"}, "SWARMTRAIN_TIMEOUT_RPC_S"),
        ({"SWARMTRAIN_TIMEOUT_RPC_S": "nan"}, "SWARMTRAIN_TIMEOUT_RPC_S"),
        ({"SWARMTRAIN_TIMEOUT_DHT_S": "inf"}, "SWARMTRAIN_TIMEOUT_DHT_S"),
        ({"SWARMTRAIN_TIMEOUT_HEARTBEAT_TTL_S": "1"}, "heartbeat_ttl_s"),
    ],
)
def test_bad_env_values_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        load_node_config({}, env=env)


def test_bad_flag_values_and_config_files(tmp_path):
    with pytest.raises(ConfigError, match="--port 70000"):
        load_node_config({"port": 70000}, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_config({}, env={}, config_path=str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config({}, env={}, config_path=write_toml(tmp_path, "[node\n"))
    # a bad value in a lower source is reported even when a higher one would override it
    with pytest.raises(ConfigError, match="SWARMTRAIN_PORT"):
        load_node_config({"port": 80}, env={"SWARMTRAIN_PORT": "x"})


# ---- membership ------------------------------------------------------------------------------


def announcement(state=NodeState.ONLINE, stage: int | None = 1, name="n", role=Role.STAGE) -> NodeAnnouncement:
    return NodeAnnouncement(peer_id="12D3KooWpeer", public_name=name, role=role, stage=stage, expert=None,
                            device="cpu", throughput=0.0, version="0.1.0", state=state, maddrs=[])


def beat(state=NodeState.ONLINE) -> Heartbeat:
    return Heartbeat(state=state, step=0)


def test_state_follows_the_newest_record():
    ann = announcement(NodeState.JOINING)
    assert derive_state(ann, NOW - 1, None, None, NOW, TTL) == "JOINING"
    assert derive_state(ann, NOW - 3, beat(NodeState.ONLINE), NOW - 1, NOW, TTL) == "ONLINE"
    # a heartbeat older than the announcement does not override what the announcement says
    assert derive_state(announcement(NodeState.ONLINE), NOW - 1, beat(NodeState.JOINING), NOW - 2, NOW, TTL) == "ONLINE"


def test_leaving_wins_over_everything():
    assert derive_state(announcement(NodeState.LEAVING), NOW - 2, beat(NodeState.ONLINE), NOW - 1, NOW, TTL) == "LEAVING"
    assert derive_state(announcement(NodeState.ONLINE), NOW - 2, beat(NodeState.LEAVING), NOW - 1, NOW, TTL) == "LEAVING"
    # even a silent node or one whose RPCs fail stays LEAVING: it said goodbye, it did not crash
    assert derive_state(announcement(NodeState.LEAVING), NOW - 100, None, None, NOW, TTL) == "LEAVING"
    assert derive_state(announcement(NodeState.LEAVING), NOW - 1, None, None, NOW, TTL, failed_rpcs=9) == "LEAVING"


def test_dead_after_heartbeat_ttl():
    ann = announcement()
    assert derive_state(ann, NOW - 30, beat(), NOW - TTL + 0.5, NOW, TTL) == "ONLINE"
    assert derive_state(ann, NOW - 30, beat(), NOW - TTL - 0.5, NOW, TTL) == DEAD
    assert derive_state(ann, NOW - TTL - 0.5, None, None, NOW, TTL) == DEAD  # announced, never heard from again


def test_restarted_node_is_not_dead_because_of_its_previous_heartbeat():
    # same key, restarted: fresh JOINING announcement, stale heartbeat from before the restart
    state = derive_state(announcement(NodeState.JOINING), NOW - 1, beat(NodeState.ONLINE), NOW - 60, NOW, TTL)
    assert state == "JOINING"


def test_dead_after_repeated_rpc_failures():
    ann = announcement()
    assert derive_state(ann, NOW - 1, beat(), NOW - 1, NOW, TTL, failed_rpcs=2, rpc_failures_for_dead=3) == "ONLINE"
    assert derive_state(ann, NOW - 1, beat(), NOW - 1, NOW, TTL, failed_rpcs=3, rpc_failures_for_dead=3) == DEAD


K1, K2, K3, K4 = (bytes([i]) * 32 for i in range(1, 5))


def test_a_peer_dead_by_failed_calls_is_live_again_once_it_announces_another_life():
    """Killed, then back from its data dir under the same key: its calls failed, but its new
    announcement (JOINING, or new addresses or another stage) clears them at once, not after the
    cool-down; the same life announcing again does not (it may heartbeat yet refuse every stream)."""
    from node.runner import MembershipView

    old = dataclasses.replace(announcement(), maddrs=["/ip4/127.0.0.1/tcp/4001"])
    members = derive_members({K1: (NOW - 5, old)}, {}, NOW, TTL)
    view = MembershipView(members=members)
    for _ in range(3):
        view.rpc_failed(K1, NOW - 2)
    assert not view.restarted_since_failing(K1, (NOW - 1, old))  # the same life, re-announced
    assert not view.restarted_since_failing(K1, (NOW - 3, dataclasses.replace(old, stage=2)))  # from before
    for life in (dataclasses.replace(old, state=NodeState.JOINING), dataclasses.replace(old, stage=2),
                 dataclasses.replace(old, maddrs=["/ip4/127.0.0.1/tcp/4002"])):
        assert view.restarted_since_failing(K1, (NOW - 1, life)), life
    assert not view.restarted_since_failing(K2, (NOW - 1, old))  # never failed
    view.rpc_succeeded(K1)
    assert K1 not in view.failed_life and not view.restarted_since_failing(K1, (NOW, dataclasses.replace(old, stage=2)))


def test_derive_members_ignores_heartbeats_without_announcement():
    members = derive_members(
        {K1: (NOW - 1, announcement(name="a"))},
        {K1: (NOW - 1, beat()), K2: (NOW - 1, beat())},
        NOW,
        TTL,
    )
    assert set(members) == {K1}
    member = members[K1]
    assert member.id == K1.hex() and member.public_key == K1 and member.state == "ONLINE"
    assert member.to_json(NOW)["public_name"] == "a" and member.to_json(NOW)["last_seen_s"] == 1.0


def test_derive_members_applies_rpc_failures_per_node():
    members = derive_members(
        {K1: (NOW - 1, announcement()), K2: (NOW - 1, announcement())},
        {K1: (NOW - 1, beat()), K2: (NOW - 1, beat())},
        NOW,
        TTL,
        failed_rpcs={K2: 3},
        rpc_failures_for_dead=3,
    )
    assert (members[K1].state, members[K2].state) == ("ONLINE", DEAD)


def view(states: dict[bytes, tuple[str, float]], names=None) -> dict:
    """A membership view: key -> (announced state, seconds since its last heartbeat)."""
    announcements = {k: (NOW - 100, announcement(NodeState(s), name=(names or {}).get(k, k[:1].hex())))
                     for k, (s, _) in states.items()}
    heartbeats = {k: (NOW - age, beat(NodeState(s))) for k, (s, age) in states.items()}
    return derive_members(announcements, heartbeats, NOW, TTL)


def test_diff_events_join_dead_leave_vanished():
    before = view({K1: ("ONLINE", 1), K2: ("ONLINE", 1), K3: ("ONLINE", 1)}, {K1: "a", K2: "b", K3: "c"})
    after = view({K1: ("ONLINE", 20), K2: ("LEAVING", 1), K4: ("JOINING", 1)}, {K1: "a", K2: "b", K4: "d"})
    events = {(e.event, e.subject): e.detail for e in diff_events(before, after, NOW)}
    assert events == {
        ("dead", K1): "a: no heartbeat for 20.0 s",
        ("leave", K2): "b is leaving",
        ("join", K4): "d joined as stage",
        ("dead", K3): "c vanished",
    }
    assert all(e.at == NOW for e in diff_events(before, after, NOW))


def test_diff_events_only_on_changes():
    current = view({K1: ("ONLINE", 1), K2: ("LEAVING", 1), K3: ("ONLINE", 30)})
    assert diff_events(current, current, NOW) == []
    # a node first seen already DEAD never joined in our eyes: no event
    assert diff_events({}, view({K1: ("ONLINE", 30)}), NOW) == []
    # gone after LEAVING or after DEAD: already reported
    assert diff_events(view({K2: ("LEAVING", 1), K3: ("ONLINE", 30)}), {}, NOW) == []
    # back from the dead
    revived = diff_events(view({K1: ("ONLINE", 30)}), view({K1: ("ONLINE", 1)}), NOW)
    assert [(e.event, e.subject) for e in revived] == [("join", K1)]


def test_dead_event_says_why():
    announcements = {K1: (NOW - 1, announcement(name="a"))}
    heartbeats = {K1: (NOW - 1, beat())}
    before = derive_members(announcements, heartbeats, NOW, TTL)
    after = derive_members(announcements, heartbeats, NOW, TTL, failed_rpcs={K1: 4}, rpc_failures_for_dead=3)
    [event] = diff_events(before, after, NOW)
    assert (event.event, event.detail) == ("dead", "a: 4 RPCs in a row failed")


def test_count_by_stage_counts_only_live_nodes():
    members = derive_members(
        {
            K1: (NOW - 1, announcement(NodeState.ONLINE, stage=1)),
            K2: (NOW - 1, announcement(NodeState.JOINING, stage=1)),
            K3: (NOW - 1, announcement(NodeState.LEAVING, stage=2)),
            K4: (NOW - 30, announcement(NodeState.ONLINE, stage=0, role=Role.DATA)),  # DEAD
            b"\x05" * 32: (NOW - 1, announcement(NodeState.ONLINE, stage=None, role=Role.ZO)),
        },
        {},
        NOW,
        TTL,
    )
    assert count_by_stage(members) == {1: 2}


# ---- roles -----------------------------------------------------------------------------------


def members_at(stages: dict[bytes, tuple[int, str]]) -> dict:
    """key -> (stage, state): ONLINE, LEAVING or DEAD."""
    announcements, heartbeats = {}, {}
    for key, (stage, state) in stages.items():
        said = NodeState.LEAVING if state == "LEAVING" else NodeState.ONLINE
        role = Role.DATA if stage == 0 else Role.STAGE
        announcements[key] = (NOW - 100, announcement(said, stage=stage, role=role))
        heartbeats[key] = (NOW - (60 if state == DEAD else 1), beat(said))
    return derive_members(announcements, heartbeats, NOW, TTL)


def test_auto_takes_the_stage_with_fewest_live_replicas():
    members = members_at({K1: (0, "ONLINE"), K2: (1, "ONLINE"), K3: (3, "ONLINE")})
    choice = choose_role("pipeline", 4, members)
    assert (choice.role, choice.stage) == (Role.STAGE, 2)
    assert "stage 2" in choice.reason and "fewest" in choice.reason


def test_auto_ties_go_to_the_lowest_stage():
    assert choose_role("pipeline", 4, {}).stage == 0
    assert choose_role("pipeline", 4, {}).role == Role.DATA
    members = members_at({K1: (0, "ONLINE"), K2: (2, "ONLINE")})
    assert choose_role("pipeline", 4, members).stage == 1


def test_auto_ignores_dead_and_leaving_members():
    members = members_at({K1: (0, "ONLINE"), K2: (1, DEAD), K3: (2, "LEAVING"), K4: (3, "ONLINE")})
    assert choose_role("pipeline", 4, members).stage == 1
    members = members_at({K1: (0, "ONLINE"), K2: (1, "ONLINE"), K3: (2, "LEAVING"), K4: (3, "ONLINE")})
    assert choose_role("pipeline", 4, members).stage == 2


def test_requested_role_and_stage_are_honoured():
    crowded = members_at({K1: (1, "ONLINE"), K2: (1, "ONLINE")})
    assert (choose_role("pipeline", 4, crowded, stage=1).role, choose_role("pipeline", 4, crowded, stage=1).stage) == (
        Role.STAGE, 1)
    data = choose_role("pipeline", 4, members_at({K1: (0, "ONLINE")}), requested="data")
    assert (data.role, data.stage) == (Role.DATA, 0)
    # --role stage never lands on stage 0, even when stage 0 is empty
    stage = choose_role("pipeline", 4, members_at({K1: (1, "ONLINE")}), requested="stage")
    assert (stage.role, stage.stage) == (Role.STAGE, 2)
    assert choose_role("pipeline", 4, {}, stage=0).role == Role.DATA


@pytest.mark.parametrize(
    "requested, stage, message",
    [
        ("auto", 4, "stage 4 does not exist"),
        ("auto", -1, "stage -1 does not exist"),
        ("boss", None, "boss"),
        ("data", 2, "--role data"),
        ("stage", 0, "stage 0 is the data role"),
    ],
)
def test_impossible_role_requests_are_refused(requested, stage, message):
    with pytest.raises(RoleError, match=message):
        choose_role("pipeline", 4, {}, requested, stage)


def test_zo_and_experts_modes_have_one_role():
    crowded = members_at({K1: (1, "ONLINE")})
    zo = choose_role("zo", 1, crowded)
    experts = choose_role("experts", 1, crowded)
    assert (zo.role, zo.stage) == (Role.ZO, None)
    assert (experts.role, experts.stage) == (Role.EXPERT, None)


# ---- identity --------------------------------------------------------------------------------


def test_identity_is_created_0600_and_reused(tmp_path):
    key = load_or_create_identity(tmp_path)
    path = tmp_path / KEY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path)
    assert public_key_bytes(again) == public_key_bytes(key)
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILENAME]  # no temporary file left behind


def test_write_private_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "owner.key"
    first, second = generate_private_key(), generate_private_key()
    write_private_key(path, first)
    with pytest.raises(IdentityError, match="already exists"):
        write_private_key(path, second)
    assert public_key_bytes(read_private_key(path)) == public_key_bytes(first)
    write_private_key(path, second, overwrite=True)
    assert public_key_bytes(read_private_key(path)) == public_key_bytes(second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_key_file_names_the_path(tmp_path):
    path = tmp_path / KEY_FILENAME
    path.write_bytes(b"not a key\n")
    with pytest.raises(IdentityError, match=str(path)):
        load_or_create_identity(tmp_path)
    with pytest.raises(IdentityError, match="does not exist"):
        read_private_key(tmp_path / "missing.key")


def test_unwritable_key_location_is_an_identity_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(IdentityError, match="cannot write key file"):
        write_private_key(tmp_path / "file" / "owner.key", generate_private_key())


def test_group_readable_key_still_loads_but_warns(tmp_path, caplog):
    path = tmp_path / "loose.key"
    key = generate_private_key()
    path.write_bytes(private_key_to_pem(key))
    os.chmod(path, 0o644)
    assert public_key_bytes(read_private_key(path)) == public_key_bytes(key)
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize("name", ["evil\x1b[2Jname", "two\nlines", "tab\tname"])
def test_public_name_must_be_printable(name):
    # it is shown on other operators' terminals and in their logs
    with pytest.raises(ConfigError, match="public-name"):
        load_node_config({"public_name": name}, env={})


def joining_at(stages: dict[bytes, tuple[int, str]]) -> dict:
    """key -> (stage, state) with state JOINING or ONLINE."""
    announcements, heartbeats = {}, {}
    for key, (stage, state) in stages.items():
        said = NodeState(state)
        role = Role.DATA if stage == 0 else Role.STAGE
        announcements[key] = (NOW - 1, announcement(said, stage=stage, role=role))
        heartbeats[key] = (NOW - 1, beat(said))
    return derive_members(announcements, heartbeats, NOW, TTL)


def test_nodes_that_joined_together_spread_over_the_stages():
    from node.roles import RoleChoice, reconsider_stage

    a, b, c = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    # all three saw an empty swarm and took stage 0
    members = joining_at({a: (0, "JOINING"), b: (0, "JOINING"), c: (0, "JOINING")})
    mine = RoleChoice(Role.DATA, 0, "")
    assert reconsider_stage(a, mine, "pipeline", 4, members) is None  # smallest id keeps the stage
    moved_b = reconsider_stage(b, mine, "pipeline", 4, members)
    assert moved_b is not None and moved_b.stage == 1 and moved_b.role == Role.STAGE
    assert "moved from stage 0" in moved_b.reason
    # the next round: b is on 1 now; c (also moved to 1 at the same time) moves on, b stays
    members = joining_at({a: (0, "JOINING"), b: (1, "JOINING"), c: (1, "JOINING")})
    assert reconsider_stage(b, RoleChoice(Role.STAGE, 1, ""), "pipeline", 4, members) is None
    assert reconsider_stage(c, RoleChoice(Role.STAGE, 1, ""), "pipeline", 4, members).stage == 2


def test_an_online_node_keeps_its_stage_and_nobody_moves_to_a_fuller_stage():
    from node.roles import RoleChoice, reconsider_stage

    a, b = b"\x01" * 32, b"\x02" * 32
    members = joining_at({a: (1, "JOINING"), b: (1, "ONLINE")})
    moved = reconsider_stage(a, RoleChoice(Role.STAGE, 1, ""), "pipeline", 2, members)
    assert moved is not None and moved.stage == 0  # b was there first, even with a larger id
    # a 2-stage run where every other stage is as full: stay
    members = joining_at({a: (1, "JOINING"), b: (1, "ONLINE"), b"\x03" * 32: (0, "ONLINE")})
    assert reconsider_stage(a, RoleChoice(Role.STAGE, 1, ""), "pipeline", 2, members) is None
    assert reconsider_stage(a, RoleChoice(Role.ZO, None, ""), "zo", 1, members) is None
