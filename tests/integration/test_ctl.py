"""mailferryctl against a real redis-server.

Every test writes its own configuration (two smtp routes, relay and api)
with a key prefix of its own, so tests share one redis-server without
seeing each other's keys. docs/ctl.md describes the commands.
"""

import itertools
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ctl_helpers import (CtlRedis, free_port, hgetall, parse_table,  # noqa: E402
                         run_ctl, write_config)

_prefixes = itertools.count(1)
HOUR_MS = 3600 * 1000


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    srv = CtlRedis(tmp_path_factory.mktemp("ctl-redis"))
    srv.start()
    yield srv
    srv.stop()


class Env:
    def __init__(self, redis, config, prefix):
        self.redis = redis
        self.config = config
        self.prefix = prefix
        self.r = redis.client()

    def ctl(self, *args, **kw):
        return run_ctl(args, config=self.config, **kw)

    def key(self, name):
        return self.prefix + name

    def policy_hash(self):
        return hgetall(self.r, self.key("policy"))


@pytest.fixture
def env(redis, tmp_path):
    prefix = "ctl%d:" % next(_prefixes)
    config = write_config(tmp_path / "mailferry.conf", redis.port, prefix)
    e = Env(redis, config, prefix)
    yield e
    e.r.close()


# -- policy get ---------------------------------------------------------------

def test_get_shows_defaults_and_file_values(env):
    res = env.ctl("policy", "get")
    assert res.rc == 0, res
    rows = parse_table(res.out)
    assert rows["route.relay.transport"] == ("smtp", "file")
    assert rows["route.relay.priority"] == ("10", "file")
    assert rows["route.api.priority"] == ("20", "file")
    assert rows["route.relay.cap_minute"] == ("0", "default")
    assert rows["route.api.enabled"] == ("yes", "default")
    assert rows["split.default"] == ("none", "default")
    assert rows["never_via.sender"] == ("none", "default")
    assert rows["throttle.patterns"][1] == "default"
    # Transport settings are not policy keys.
    assert "route.relay.host" not in rows
    assert "route.relay.tls" not in rows


def test_get_file_policy_section(redis, tmp_path):
    config = write_config(tmp_path / "p.conf", redis.port, "ctlfile:",
                          "[policy]\npin.class.bulk = relay:80,api:20\n")
    res = run_ctl(["policy", "get"], config=config)
    assert res.rc == 0, res
    rows = parse_table(res.out)
    assert rows["pin.class.bulk"] == ("relay:80,api:20", "file")


def test_get_json_and_single_key(env):
    res = env.ctl("--json", "policy", "get")
    assert res.rc == 0, res
    doc = res.json()
    assert doc["route.relay.priority"] == {"value": "10", "source": "file"}
    assert doc["route.api.cap_day"] == {"value": "0", "source": "default"}

    res = env.ctl("policy", "get", "Route.Relay.Priority")
    assert res.rc == 0, res
    assert parse_table(res.out) == {"route.relay.priority": ("10", "file")}

    # --json may also follow the command.
    res = env.ctl("policy", "get", "pin.rcpt.example.com", "--json")
    assert res.rc == 0, res
    assert res.json() == {"pin.rcpt.example.com": {"value": "none", "source": "default"}}


def test_get_unknown_key(env):
    res = env.ctl("policy", "get", "route.nope.cap_minute")
    assert res.rc == 2, res
    assert "route.nope.cap_minute" in res.err
    res = env.ctl("policy", "get", "nonsense")
    assert res.rc == 2, res
    assert "nonsense: not a policy key" in res.err


# -- policy set ---------------------------------------------------------------

def test_set_valid_keys(env):
    res = env.ctl("policy", "set", "route.relay.cap_minute", "100")
    assert res.rc == 0, res
    assert res.out == "route.relay.cap_minute = 100 (applied by routers within 1000 ms)\n"

    # Keys and values are stored in their canonical form.
    res = env.ctl("policy", "set", "split.default", " Relay:90, API:10 ")
    assert res.rc == 0, res
    assert res.out.startswith("split.default = relay:90,api:10 ")
    res = env.ctl("policy", "set", "pin.rcpt.Gmail.COM", "api")
    assert res.rc == 0, res

    assert env.r("HGET", env.key("policy"), "route.relay.cap_minute") == b"100"
    assert env.r("HGET", env.key("policy"), "split.default") == b"relay:90,api:10"
    assert env.r("HGET", env.key("policy"), "pin.rcpt.gmail.com") == b"api"
    assert len(env.policy_hash()) == 3

    rows = parse_table(env.ctl("policy", "get").out)
    assert rows["route.relay.cap_minute"] == ("100", "live")
    assert rows["split.default"] == ("relay:90,api:10", "live")
    assert rows["pin.rcpt.gmail.com"] == ("api", "live")
    assert rows["route.relay.priority"] == ("10", "file")
    assert rows["route.api.cap_minute"] == ("0", "default")


def test_set_reports_policy_refresh(redis, tmp_path):
    config = write_config(tmp_path / "r.conf", redis.port, "ctlrefresh:",
                          "[router]\npolicy_refresh = 2500\n")
    res = run_ctl(["policy", "set", "route.api.enabled", "no"], config=config)
    assert res.rc == 0, res
    assert res.out == "route.api.enabled = no (applied by routers within 2500 ms)\n"


@pytest.mark.parametrize("key,value,needle", [
    ("route.relay.cap_minute", "lots", "route.relay.cap_minute: must be an integer"),
    ("split.default", "relay:90,mars:10", "split.default"),
    ("pin.rcpt.gmail.com", "nowhere", "pin.rcpt.gmail.com"),
    ("route.relay.breaker_cooldown", "-5", "route.relay.breaker_cooldown"),
])
def test_set_invalid_value_writes_nothing(env, key, value, needle):
    assert env.ctl("policy", "set", "route.api.cap_hour", "50").rc == 0
    before = env.policy_hash()
    res = env.ctl("policy", "set", key, value)
    assert res.rc == 2, res
    assert res.err.startswith("mailferryctl: "), res
    assert needle in res.err, res
    assert res.out == ""
    assert env.policy_hash() == before


def test_set_unknown_route(env):
    res = env.ctl("policy", "set", "route.mars.cap_minute", "10")
    assert res.rc == 2, res
    assert 'no route named "mars"' in res.err, res
    assert env.policy_hash() == {}


def test_set_transport_change_and_transport_keys(env):
    res = env.ctl("policy", "set", "route.relay.transport", "api")
    assert res.rc == 2, res
    assert "route.relay.transport" in res.err
    res = env.ctl("policy", "set", "route.relay.host", "10.0.0.1:25")
    assert res.rc == 2, res
    assert "route.relay.host: not a policy key" in res.err
    res = env.ctl("policy", "set", "nonsense", "1")
    assert res.rc == 2, res
    assert env.policy_hash() == {}


def test_set_checks_the_whole_policy(env):
    # Valid on its own, but above the file's throttle_backoff_max (3600).
    res = env.ctl("policy", "set", "route.relay.throttle_backoff", "5000")
    assert res.rc == 2, res
    assert "route.relay.throttle_backoff_max" in res.err
    assert env.policy_hash() == {}
    # Together with a live maximum it is fine.
    assert env.ctl("policy", "set", "route.relay.throttle_backoff_max", "7200").rc == 0
    assert env.ctl("policy", "set", "route.relay.throttle_backoff", "5000").rc == 0
    assert env.policy_hash() == {"route.relay.throttle_backoff_max": "7200",
                                 "route.relay.throttle_backoff": "5000"}


def test_set_several_keys_together(env):
    # warmup_start and warmup_caps are only valid together.
    res = env.ctl("policy", "set", "route.relay.warmup_start", "2024-05-08")
    assert res.rc == 2, res
    assert "warmup_start and warmup_caps must be set together" in res.err
    assert env.policy_hash() == {}

    res = env.ctl("policy", "set", "route.relay.warmup_start", "2024-05-08",
                  "route.relay.warmup_caps", "200, 500, 1000")
    assert res.rc == 0, res
    assert res.out.splitlines() == [
        "route.relay.warmup_start = 2024-05-08 (applied by routers within 1000 ms)",
        "route.relay.warmup_caps = 200,500,1000 (applied by routers within 1000 ms)",
    ]
    assert env.policy_hash() == {"route.relay.warmup_start": "2024-05-08",
                                 "route.relay.warmup_caps": "200,500,1000"}

    # Resetting one of them alone would break the policy; both at once is fine.
    res = env.ctl("policy", "reset", "route.relay.warmup_caps")
    assert res.rc == 2, res
    assert len(env.policy_hash()) == 2
    res = env.ctl("policy", "reset", "route.relay.warmup_caps", "route.relay.warmup_start")
    assert res.rc == 0, res
    assert env.policy_hash() == {}

    # All or nothing: one bad pair and nothing is written.
    res = env.ctl("policy", "set", "route.relay.cap_hour", "10", "route.api.cap_hour", "x")
    assert res.rc == 2, res
    assert "route.api.cap_hour" in res.err
    assert env.policy_hash() == {}

    res = env.ctl("policy", "set", "route.relay.cap_hour", "10", "Route.Relay.Cap_Hour", "20")
    assert res.rc == 2, res
    assert "more than once" in res.err


def test_concurrent_sets_all_land(env):
    # Each set is a WATCH/MULTI/EXEC transaction retried on conflict, so
    # concurrent operators do not lose each other's changes.
    import subprocess
    from ctl_helpers import MAILFERRYCTL_BIN, ctl_env
    procs = [subprocess.Popen([MAILFERRYCTL_BIN, "--config", str(env.config), "policy", "set",
                               "pin.rcpt.d%d.example" % i, "api" if i % 2 else "relay"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctl_env())
             for i in range(12)]
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    assert env.policy_hash() == {"pin.rcpt.d%d.example" % i: "api" if i % 2 else "relay"
                                 for i in range(12)}


def test_set_replaces_a_field_spelled_differently(env):
    env.r("HSET", env.key("policy"), "Route.Relay.Cap_Minute", "7")
    rows = parse_table(env.ctl("policy", "get").out)
    assert rows["route.relay.cap_minute"] == ("7", "live")
    assert env.ctl("policy", "set", "route.relay.cap_minute", "8").rc == 0
    assert env.policy_hash() == {"route.relay.cap_minute": "8"}


def test_broken_live_field_is_named(env):
    env.r("HSET", env.key("policy"), "route.relay.cap_day", "many")
    res = env.ctl("policy", "set", "route.api.cap_day", "10")
    assert res.rc == 2, res
    assert "route.relay.cap_day" in res.err
    assert "policy reset route.relay.cap_day" in res.err
    assert env.policy_hash() == {"route.relay.cap_day": "many"}

    # get warns and shows the file's policy.
    res = env.ctl("policy", "get")
    assert res.rc == 0, res
    assert "warning" in res.err and "route.relay.cap_day" in res.err
    assert parse_table(res.out)["route.relay.cap_day"] == ("0", "default")

    # The broken field can be reset.
    res = env.ctl("policy", "reset", "route.relay.cap_day")
    assert res.rc == 0, res
    assert env.policy_hash() == {}


def test_set_value_starting_with_dash(env):
    # Options end at the command, so a value may begin with '-'.
    res = env.ctl("policy", "set", "route.relay.cap_minute", "-1")
    assert res.rc == 2, res
    assert "route.relay.cap_minute" in res.err


# -- policy reset -------------------------------------------------------------

def test_reset_key_and_all(env):
    for k, v in (("route.relay.cap_minute", "100"), ("split.default", "relay:90,api:10"),
                 ("route.relay.priority", "30")):
        assert env.ctl("policy", "set", k, v).rc == 0

    res = env.ctl("policy", "reset", "route.relay.cap_minute")
    assert res.rc == 0, res
    assert res.out.startswith("route.relay.cap_minute = 0 (default value")
    assert "route.relay.cap_minute" not in env.policy_hash()

    res = env.ctl("policy", "reset", "route.relay.priority")
    assert res.rc == 0, res
    assert res.out.startswith("route.relay.priority = 10 (file value")
    rows = parse_table(env.ctl("policy", "get").out)
    assert rows["route.relay.priority"] == ("10", "file")
    assert rows["split.default"] == ("relay:90,api:10", "live")

    # Resetting a key without an override is harmless.
    res = env.ctl("policy", "reset", "route.relay.priority")
    assert res.rc == 0, res
    assert "no live override" in res.out

    assert env.ctl("policy", "set", "pin.sender.bank.example", "relay,strict").rc == 0
    res = env.ctl("policy", "reset")
    assert res.rc == 0, res
    assert "removed 2 live overrides" in res.out
    assert env.r("EXISTS", env.key("policy")) == 0
    rows = parse_table(env.ctl("policy", "get").out)
    assert all(src != "live" for _, src in rows.values())


def test_reset_unknown_key(env):
    res = env.ctl("policy", "reset", "route.mars.cap_minute")
    assert res.rc == 2, res
    assert "route.mars.cap_minute" in res.err


def test_reset_refuses_to_break_the_policy(env):
    assert env.ctl("policy", "set", "route.relay.throttle_backoff_max", "7200").rc == 0
    assert env.ctl("policy", "set", "route.relay.throttle_backoff", "5000").rc == 0
    res = env.ctl("policy", "reset", "route.relay.throttle_backoff_max")
    assert res.rc == 2, res
    assert "route.relay.throttle_backoff_max" in res.err
    assert len(env.policy_hash()) == 2


def test_live_removal_of_a_file_pin_is_shown(redis, tmp_path):
    config = write_config(tmp_path / "pin.conf", redis.port, "ctlpin:",
                          "[policy]\npin.rcpt.yahoo.com = api\n")
    res = run_ctl(["policy", "set", "pin.rcpt.yahoo.com", "none"], config=config)
    assert res.rc == 0, res
    rows = parse_table(run_ctl(["policy", "get"], config=config).out)
    assert rows["pin.rcpt.yahoo.com"] == ("none", "live")


# -- queue --------------------------------------------------------------------

def test_queue_empty(env):
    res = env.ctl("queue")
    assert res.rc == 0, res
    lines = {ln.split()[0]: ln.split()[1] for ln in res.out.splitlines()
             if ln and ln.split()[0] in ("ready", "in", "retry", "dead", "oldest")}
    assert lines == {"ready": "0", "in": "flight", "retry": "0", "dead": "0", "oldest": "-"}
    assert "relay" in res.out and "api" in res.out

    doc = env.ctl("--json", "queue").json()
    assert doc["ready"] == 0
    assert doc["in_flight"] == 0
    assert doc["retry"] == 0
    assert doc["retry_next_due_ms"] is None
    assert doc["dead"] == 0
    assert doc["oldest_age_ms"] is None
    assert set(doc["routes"]) == {"relay", "api", "hold"}
    for st in doc["routes"].values():
        assert (st["delivered"], st["deferred"], st["bounced"], st["held"]) == (0, 0, 0, 0)
        assert st["share"] is None


def test_queue_counts(env):
    r, k = env.r, env.key
    now = int(time.time() * 1000)
    # Five messages queued; the router group reads two of them.
    r("XGROUP", "CREATE", k("ready"), "routers", "0", "MKSTREAM")
    for i in range(5):
        r("XADD", k("ready"), "*", "id", "m%d" % i)
        r("HSET", k("msg:m%d" % i), "created", str(now - 1000 * (10 - i)))
    r("XREADGROUP", "GROUP", "routers", "r1", "COUNT", "2", "STREAMS", k("ready"), ">")
    # Three waiting for a retry; the first due is also the oldest message.
    r("ZADD", k("retry"), str(now + 60000), "q1", str(now + 120000), "q2",
      str(now + 180000), "q3")
    r("HSET", k("msg:q1"), "created", str(now - 2 * HOUR_MS))
    r("XADD", k("dead"), "*", "id", "d1", "reason", "expired", "from", "")
    hour = now // HOUR_MS
    r("HSET", k("stats:relay:%d" % hour), "delivered", "60", "deferred", "4", "bounced", "2")
    r("HSET", k("stats:relay:%d" % (hour - 1)), "delivered", "30")
    r("HSET", k("stats:api:%d" % hour), "delivered", "10", "bounced", "1")
    r("HSET", k("stats:hold:%d" % hour), "held", "7")
    # Outside the window: two hours ago.
    r("HSET", k("stats:api:%d" % (hour - 2)), "delivered", "1000")

    doc = env.ctl("queue", "--json").json()
    assert doc["ready"] == 3
    assert doc["in_flight"] == 2
    assert doc["consumers"] == 1
    assert doc["retry"] == 3
    assert doc["retry_next_due_ms"] == now + 60000
    assert doc["dead"] == 1
    assert doc["oldest_id"] == "q1"
    assert doc["oldest_created_ms"] == now - 2 * HOUR_MS
    assert 2 * HOUR_MS <= doc["oldest_age_ms"] < 2 * HOUR_MS + 60000
    assert doc["routes"]["relay"] == {"delivered": 90, "deferred": 4, "bounced": 2,
                                      "held": 0, "share": 90.0}
    assert doc["routes"]["api"] == {"delivered": 10, "deferred": 0, "bounced": 1,
                                    "held": 0, "share": 10.0}
    assert doc["routes"]["hold"]["held"] == 7
    assert doc["routes"]["hold"]["share"] is None

    res = env.ctl("queue")
    assert res.rc == 0, res
    words = {ln.split()[0]: ln.split() for ln in res.out.splitlines() if ln.strip()}
    assert words["ready"][1] == "3"
    assert words["in"][2] == "2"
    assert words["retry"][1] == "3"
    assert "next due in" in " ".join(words["retry"])
    assert words["dead"][1] == "1"
    assert words["oldest"][1].startswith("2h0")
    assert words["relay"][1:3] == ["90", "90.0%"]
    assert words["api"][1:3] == ["10", "10.0%"]
    assert words["hold"][-1] == "7"
    assert words["total"][1:3] == ["100", "100.0%"]


def test_queue_oldest_from_unread_and_pending(env):
    r, k = env.r, env.key
    now = int(time.time() * 1000)
    r("XGROUP", "CREATE", k("ready"), "routers", "0", "MKSTREAM")
    for i in range(3):
        r("XADD", k("ready"), "*", "id", "p%d" % i)
    r("HSET", k("msg:p0"), "created", str(now - 300000))
    r("HSET", k("msg:p2"), "created", str(now - 600000))
    r("XREADGROUP", "GROUP", "routers", "r1", "COUNT", "2", "STREAMS", k("ready"), ">")
    doc = env.ctl("--json", "queue").json()
    assert doc["ready"] == 1 and doc["in_flight"] == 2
    assert doc["oldest_id"] == "p2"
    assert doc["oldest_in"] == "ready"
    # Once p2 is read too, the oldest pending entry is p0 (p2 is later in
    # the stream: the approximation looks at the first entry only).
    r("XREADGROUP", "GROUP", "routers", "r1", "COUNT", "5", "STREAMS", k("ready"), ">")
    doc = env.ctl("--json", "queue").json()
    assert doc["ready"] == 0 and doc["in_flight"] == 3
    assert doc["oldest_id"] == "p0"
    assert doc["oldest_in"] == "in flight"


def test_queue_without_group(env):
    # The gateway queued mail before any router started.
    env.r("XADD", env.key("ready"), "*", "id", "x1")
    env.r("XADD", env.key("ready"), "*", "id", "x2")
    doc = env.ctl("--json", "queue").json()
    assert doc["ready"] == 2
    assert doc["in_flight"] == 0
    assert doc["oldest_id"] == "x1"


def test_environment_overrides_the_file(env):
    env.r("HSET", "other:policy", "route.relay.cap_minute", "5")
    res = env.ctl("policy", "get", "route.relay.cap_minute",
                  env={"MAILFERRY_QUEUE_PREFIX": "other:"})
    assert res.rc == 0, res
    assert parse_table(res.out) == {"route.relay.cap_minute": ("5", "live")}
    env.r("DEL", "other:policy")


def test_config_from_environment(env):
    res = run_ctl(["policy", "get", "route.api.priority"],
                  env={"MAILFERRY_CONFIG": str(env.config)})
    assert res.rc == 0, res
    assert parse_table(res.out) == {"route.api.priority": ("20", "file")}


# -- errors -------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["queue"],
    ["policy", "get"],
    ["policy", "set", "route.relay.cap_minute", "5"],
    ["policy", "reset"],
])
def test_redis_unreachable(tmp_path, args):
    port = free_port()
    config = write_config(tmp_path / "down.conf", port, "ctldown:")
    res = run_ctl(args, config=config)
    assert res.rc == 1, res
    assert res.err.startswith("mailferryctl: cannot reach Redis at 127.0.0.1:%d: " % port), res
    assert res.out == ""


def test_redis_not_answering(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        port = s.getsockname()[1]
        config = write_config(tmp_path / "mute.conf", port, "ctlmute:")
        start = time.monotonic()
        res = run_ctl(["queue"], config=config)
        assert time.monotonic() - start < 10
    assert res.rc == 1, res
    assert "cannot reach Redis at 127.0.0.1:%d" % port in res.err


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["policy"],
    ["policy", "get", "a", "b"],
    ["policy", "set", "route.relay.cap_minute"],
    ["policy", "set", "a", "b", "c"],
    ["queue", "extra"],
    ["--bogus", "queue"],
])
def test_usage_errors(env, args):
    res = env.ctl(*args)
    assert res.rc == 2, res
    assert "usage: mailferryctl" in res.err


def test_help(env):
    res = run_ctl(["--help"])
    assert res.rc == 0
    assert "usage: mailferryctl" in res.out


def test_bad_config(tmp_path):
    res = run_ctl(["queue"], config=tmp_path / "missing.conf")
    assert res.rc == 2, res
    assert "missing.conf" in res.err
    bad = tmp_path / "bad.conf"
    bad.write_text("[route relay]\ntransport = smtp\nhost = 127.0.0.1:1\ntls = none\n"
                   "cap_minute = lots\n")
    res = run_ctl(["policy", "get"], config=bad)
    assert res.rc == 2, res
    assert "cap_minute" in res.err


def test_json_round_trip(env):
    for k, v in (("pin.sender.bank.example", "relay,strict"), ("pin.rcpt.yahoo.com", "hold"),
                 ("route.relay.domain_caps.gmail.com", "100,3000,30000")):
        assert env.ctl("policy", "set", k, v).rc == 0
    assert env.ctl("policy", "set", "route.api.warmup_start", "2024-05-08",
                   "route.api.warmup_caps", "200,500,1000").rc == 0
    stored = env.policy_hash()
    doc = env.ctl("--json", "policy", "get").json()
    for k, v in stored.items():
        assert doc[k] == {"value": v, "source": "live"}, k


def test_queue_json_with_a_binary_message_id(env):
    # A hand-written entry whose id is not UTF-8 still gives valid JSON.
    env.r("XADD", env.key("ready"), "*", "id", b"\xff\xfeodd")
    res = env.ctl("--json", "queue")
    assert res.rc == 0, res
    doc = json.loads(res.out)
    assert doc["ready"] == 1
    assert doc["oldest_id"] == "??odd"
