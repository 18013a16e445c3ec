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

from ctl_helpers import (CtlRedis, add_dead, add_event, decode, free_port,  # noqa: E402
                         hgetall, parse_rows, parse_table, queue_id, rcpt_state, run_ctl,
                         write_config, write_msg)

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
    ("route.relay.bounce_rate_max", "150%", "route.relay.bounce_rate_max: must be a rate"),
    ("route.api.deferral_rate_max", "lots", "route.api.deferral_rate_max: must be a rate"),
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
    ["queue", "list"],
    ["queue", "show", "01a225c7be711283c366c7"],
    ["queue", "delete", "01a225c7be711283c366c7"],
    ["queue", "retry", "01a225c7be711283c366c7"],
    ["queue", "retry", "--all"],
    ["dead", "list"],
    ["dead", "requeue", "01a225c7be711283c366c7"],
    ["dead", "requeue", "--all"],
    ["route", "suspend", "relay"],
    ["route", "resume", "relay"],
    ["stats"],
    ["--json", "stats"],
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
    ["queue", "list", "extra"],
    ["queue", "list", "--bogus"],
    ["queue", "list", "--route"],
    ["queue", "list", "--json=yes"],
    ["queue", "show"],
    ["queue", "show", "a", "b"],
    ["queue", "show", ""],
    ["queue", "show", "a", "--limit", "5"],
    ["queue", "delete"],
    ["queue", "retry"],
    ["queue", "retry", "a", "--all"],
    ["queue", "retry", "--all", "--all=x"],
    ["dead"],
    ["dead", "bury"],
    ["dead", "requeue"],
    ["dead", "requeue", "a", "--all"],
    ["dead", "list", "--route", "relay"],
    ["route"],
    ["route", "suspend"],
    ["route", "drain", "relay"],
    ["route", "suspend", "relay", "api"],
    ["stats", "relay"],
    ["stats", "--all"],
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


# == issue 7 part 2: the rest of the operator's tool ============================
#
# The state below is written the way gateway and router write it
# (ctl_helpers.write_msg, rcpt_state, add_event, add_dead); the end-to-end
# tests at the bottom let a real `mailferry all` write it instead.

def now_ms():
    return int(time.time() * 1000)


def queued(env, qid, sender="a@x.test", rcpts=("r1@x.test",), age_ms=60000, **kw):
    """A message, queued as a gateway queues it: hash and ready entry."""
    write_msg(env.r, env.prefix, qid, sender, list(rcpts), now_ms() - age_ms, **kw)
    return decode(env.r("XADD", env.key("ready"), "*", "id", qid))


def deferred(env, qid, due_in_ms=300000, sender="a@x.test", age_ms=600000, route="relay"):
    """A message after one round that left its second recipient deferred:
    in the retry set, as router/store.c store_finish_retry() leaves it."""
    t = now_ms() - 5000
    states = {0: rcpt_state("delivered", 250, "2.0.0", "Ok", route, "mx1.x.test", t, 1),
              1: rcpt_state("deferred", 451, "4.3.0", "Try later", route, "mx1.x.test", t, 1)}
    due = now_ms() + due_in_ms
    write_msg(env.r, env.prefix, qid, sender, ["ok@x.test", "later@y.test"],
              now_ms() - age_ms, states=states, attempts=1, next_attempt=due)
    env.r("ZADD", env.key("retry"), str(due), qid)
    return due


def dead_msg(env, qid, sender="", age_ms=60000):
    """A message that failed with nobody to tell: the hash stays, with the
    failure marked "b", and a dead entry names it (store_finish_done)."""
    t = now_ms() - 1000
    states = {0: rcpt_state("failed", 550, "5.1.1", "User unknown", "relay", "mx1.x.test",
                            t, 2, b=True),
              1: rcpt_state("delivered", 250, "2.0.0", "Ok", "relay", "mx1.x.test", t, 1)}
    write_msg(env.r, env.prefix, qid, sender, ["gone@x.test", "ok@x.test"], now_ms() - age_ms,
              states=states, attempts=1)
    return add_dead(env.r, env.prefix, qid, sender)


# -- queue list ---------------------------------------------------------------

def test_list_empty(env):
    res = env.ctl("queue", "list")
    assert res.rc == 0, res
    assert res.out.splitlines()[0].split() == ["ID", "AGE", "WHERE", "NEXT", "ATTEMPT", "FROM",
                                               "RCPTS", "LAST", "ROUTE"]
    assert "(no queued message)" in res.out
    doc = env.ctl("queue", "list", "--json").json()
    assert doc["messages"] == [] and doc["truncated"] is False


def test_list_in_flight_ready_and_retry(env):
    r, k = env.r, env.key
    r("XGROUP", "CREATE", k("ready"), "routers", "0", "MKSTREAM")
    a, b, c = queue_id(), queue_id(), queue_id()
    queued(env, a, age_ms=7200 * 1000)
    queued(env, b, sender="", rcpts=["x@x.test", "y@y.test"])
    r("XREADGROUP", "GROUP", "routers", "router-7", "COUNT", "1", "STREAMS", k("ready"), ">")
    due = deferred(env, c, due_in_ms=240000)

    doc = env.ctl("--json", "queue", "list").json()
    got = [(m["id"], m["where"]) for m in doc["messages"]]
    assert got == [(a, "in_flight"), (b, "ready"), (c, "retry")]
    ma, mb, mc = doc["messages"]
    assert ma["consumer"] == "router-7" and ma["deliveries"] == 1
    assert 7200 * 1000 <= ma["age_ms"] < 7300 * 1000
    assert (mb["from"], mb["rcpts"], mb["pending"]) == ("", 2, 2)
    assert mb["last_route"] is None and mb["routes"] == []
    assert mc["next_attempt_ms"] == due
    assert (mc["rcpts"], mc["pending"], mc["attempts"]) == (2, 1, 1)
    assert mc["last_route"] == "relay"
    assert doc["truncated"] is False and doc["stale_entries"] == 0

    res = env.ctl("queue", "list")
    assert res.rc == 0, res
    rows = {row[0]: row for row in parse_rows(res.out, "ID")}
    assert rows[a][1].startswith("2h0") and rows[a][2] == "in-flight" and rows[a][3] == "running"
    assert rows[b][2:4] == ["ready", "now"] and rows[b][4] == "<>" and rows[b][5] == "2/2"
    assert rows[c][2:5] == ["retry", "in", "3m59s"] or rows[c][2:5] == ["retry", "in", "4m00s"]
    assert rows[c][-2:] == ["1/2", "relay"]


def test_list_filters_and_limit(env):
    olds = [queue_id() for _ in range(3)]
    for qid in olds:
        queued(env, qid, age_ms=3 * 3600 * 1000)
    young = queue_id()
    queued(env, young, age_ms=1000)
    via_api = queue_id()
    deferred(env, via_api, route="api", age_ms=2 * 3600 * 1000)

    ids = lambda *a: [m["id"] for m in env.ctl("--json", "queue", "list", *a).json()["messages"]]
    assert ids() == olds + [young, via_api]
    assert ids("--older-than", "2h") == olds + [via_api]
    assert ids("--older-than=150m") == olds
    assert ids("--older-than", "1d") == []
    assert ids("--route", "api") == [via_api]
    assert ids("--route", "API", "--older-than", "1h") == [via_api]
    assert ids("--route", "relay") == []

    doc = env.ctl("queue", "list", "--limit", "2", "--json").json()
    assert [m["id"] for m in doc["messages"]] == olds[:2]
    assert doc["truncated"] is True
    res = env.ctl("queue", "list", "--limit", "2")
    assert "(first 2 shown; more match: use --limit)" in res.out
    res = env.ctl("queue", "list", "--route", "mars")
    assert res.rc == 0 and "(no queued message matches)" in res.out


def test_list_skips_entries_of_deleted_messages(env):
    env.r("XADD", env.key("ready"), "*", "id", "vanished")
    live = queue_id()
    queued(env, live)
    doc = env.ctl("--json", "queue", "list").json()
    assert [m["id"] for m in doc["messages"]] == [live]
    assert doc["stale_entries"] == 1
    assert "1 queue entry without a message" in env.ctl("queue", "list").out


@pytest.mark.parametrize("args,needle", [
    (["--older-than", "soon"], "--older-than: bad value \"soon\""),
    (["--older-than", "-5m"], "--older-than"),
    (["--older-than", "5y"], "--older-than"),
    (["--limit", "0"], "--limit: bad value \"0\""),
    (["--limit", "ten"], "--limit"),
    (["--limit", "9999999999"], "--limit"),
    (["--route="], "--route"),
])
def test_list_bad_values(env, args, needle):
    res = env.ctl("queue", "list", *args)
    assert res.rc == 2, res
    assert needle in res.err, res
    assert res.out == ""


# -- queue show ---------------------------------------------------------------

def test_show_retry_message_with_history(env):
    qid = queue_id()
    due = deferred(env, qid, due_in_ms=120000)
    other = queue_id()
    add_event(env.r, env.prefix, qid, "ok@x.test", "relay", "delivered", 250, "2.0.0", "Ok",
              "mx1.x.test")
    add_event(env.r, env.prefix, other, "z@x.test", "api", "delivered", 250)
    add_event(env.r, env.prefix, qid, "later@y.test", "relay", "deferred", 451, "4.3.0",
              "Try later", "mx1.x.test", latency_ms=40)

    doc = env.ctl("--json", "queue", "show", qid).json()
    assert doc["id"] == qid
    assert doc["status"] == {"where": "retry", "due_ms": due}
    assert doc["from"] == "a@x.test" and doc["client_ip"] == "192.0.2.7"
    assert doc["attempts"] == 1 and doc["next_attempt_ms"] == due
    rc = doc["recipients"]
    assert [(x["rcpt"], x["state"], x["code"], x["route"]) for x in rc] == [
        ("ok@x.test", "delivered", 250, "relay"), ("later@y.test", "deferred", 451, "relay")]
    assert rc[1]["enh"] == "4.3.0" and rc[1]["text"] == "Try later"
    assert rc[1]["remote"] == "mx1.x.test" and rc[1]["attempts"] == 1
    assert [(h["rcpt"], h["result"], h["code"]) for h in doc["history"]] == [
        ("ok@x.test", "delivered", 250), ("later@y.test", "deferred", 451)]
    assert doc["history"][1]["latency_ms"] == 40 and doc["history"][1]["reason"] == "primary"
    assert doc["history_complete"] is True and doc["history_scanned"] == 3

    res = env.ctl("queue", "show", qid)
    assert res.rc == 0, res
    assert "waiting for a retry in 1m59s" in res.out or "waiting for a retry in 2m00s" in res.out
    assert "2 (0 pending, 1 deferred, 1 delivered, 0 failed)" in res.out
    rows = parse_rows(res.out, "RECIPIENT")
    assert rows[1][:6] == ["later@y.test", "deferred", "451", "4.3.0", "relay", "1"]
    assert "attempt history: 2 events (searched the 3 events" in res.out
    hist = parse_rows(res.out, "TIME")
    assert [h[2:5] for h in hist] == [["ok@x.test", "relay", "delivered"],
                                      ["later@y.test", "relay", "deferred"]]

    # A scan shorter than the stream says the history may be incomplete.
    doc = env.ctl("--json", "queue", "show", qid, "--scan", "1").json()
    assert doc["history_complete"] is False and doc["history_scanned"] == 1
    assert len(doc["history"]) == 1 and doc["history"][0]["rcpt"] == "later@y.test"
    assert "use --scan N" in env.ctl("queue", "show", qid, "--scan=1").out


def test_show_in_flight_ready_and_dead(env):
    r, k = env.r, env.key
    r("XGROUP", "CREATE", k("ready"), "routers", "0", "MKSTREAM")
    a, b = queue_id(), queue_id()
    ea = queued(env, a)
    eb = queued(env, b, cls="bulk", auth_user="alice")
    r("XREADGROUP", "GROUP", "routers", "r9", "COUNT", "1", "STREAMS", k("ready"), ">")

    doc = env.ctl("--json", "queue", "show", a).json()
    assert doc["status"]["where"] == "in_flight"
    assert doc["status"]["consumer"] == "r9" and doc["status"]["stream_id"] == ea
    assert doc["recipients"][0]["state"] == "pending" and doc["recipients"][0]["code"] is None
    assert "in flight: read by router r9" in env.ctl("queue", "show", a).out

    doc = env.ctl("--json", "queue", "show", b).json()
    assert doc["status"] == {"where": "ready", "stream_id": eb}
    assert (doc["class"], doc["auth_user"]) == ("bulk", "alice")
    assert doc["history"] == [] and doc["history_complete"] is True

    d = queue_id()
    entry = dead_msg(env, d)
    doc = env.ctl("--json", "queue", "show", d).json()
    assert doc["status"]["where"] == "dead" and doc["status"]["dead_entry"] == entry
    assert doc["status"]["reason"].startswith("failed, no bounce")
    assert doc["recipients"][0]["bounced"] is True
    out = env.ctl("queue", "show", d).out
    assert "dead: failed, no bounce" in out and "mailferryctl dead requeue %s" % d in out
    assert "from         <>" in out


def test_show_missing_message(env):
    res = env.ctl("queue", "show", "01a225c7be711283c366c7")
    assert res.rc == 1, res
    assert res.err == ("mailferryctl: no such message: 01a225c7be711283c366c7 (delivered, "
                       "deleted or never queued)\n")
    assert res.out == ""
    assert env.ctl("--json", "queue", "show", "nope").rc == 1


def test_show_bad_scan(env):
    res = env.ctl("queue", "show", "x", "--scan", "0")
    assert res.rc == 2 and "--scan: bad value \"0\"" in res.err, res


# -- queue delete -------------------------------------------------------------

def test_delete_retry_message(env):
    qid = queue_id()
    deferred(env, qid)
    keep = queue_id()
    deferred(env, keep)
    res = env.ctl("queue", "delete", qid)
    assert res.rc == 0, res
    assert res.out == ("deleted message %s (from a@x.test, 2 recipients, 1 not final); "
                       "removed from the retry set\n" % qid)
    assert env.r("EXISTS", env.key("msg:" + qid)) == 0
    assert env.r("ZSCORE", env.key("retry"), qid) is None
    assert env.r("ZSCORE", env.key("retry"), keep) is not None

    res = env.ctl("queue", "delete", qid)
    assert res.rc == 1, res
    assert res.err == "mailferryctl: no such message: %s\n" % qid

    doc = env.ctl("--json", "queue", "delete", keep).json()
    assert doc == {"id": keep, "deleted": True, "retry_removed": True,
                   "dead_entries_removed": 0}


def test_delete_ready_message_leaves_the_entry(env):
    qid = queue_id()
    queued(env, qid)
    assert env.ctl("queue", "delete", qid).rc == 0
    assert env.r("EXISTS", env.key("msg:" + qid)) == 0
    # The stream entry stays until a router reads it and finds no message.
    assert env.r("XLEN", env.key("ready")) == 1
    doc = env.ctl("--json", "queue", "list").json()
    assert doc["messages"] == [] and doc["stale_entries"] == 1


def test_delete_dead_message_and_orphan_entry(env):
    d = queue_id()
    dead_msg(env, d)
    other = queue_id()
    dead_msg(env, other)
    res = env.ctl("queue", "delete", d)
    assert res.rc == 0, res
    assert res.out.endswith("; removed 1 dead entry\n"), res
    assert [f["id"] for f in dead_ids(env)] == [other]

    # A dead entry whose message is gone can be removed too.
    env.r("DEL", env.key("msg:" + other))
    doc = env.ctl("--json", "queue", "delete", other).json()
    assert doc == {"id": other, "deleted": False, "retry_removed": False,
                   "dead_entries_removed": 1}
    assert env.r("XLEN", env.key("dead")) == 0


def dead_ids(env):
    out = []
    for _eid, fields in env.r("XRANGE", env.key("dead"), "-", "+"):
        out.append({decode(fields[i]): decode(fields[i + 1]) for i in range(0, len(fields), 2)})
    return out


# -- queue retry --------------------------------------------------------------

def ready_ids(env):
    return [decode(f[1]) for _eid, f in env.r("XRANGE", env.key("ready"), "-", "+")]


def test_retry_one_and_all(env):
    ids = [queue_id() for _ in range(4)]
    for i, qid in enumerate(ids):
        deferred(env, qid, due_in_ms=60000 * (i + 1))
    res = env.ctl("queue", "retry", ids[2])
    assert res.rc == 0, res
    assert res.out == ("message %s moved from the retry set to the ready stream: routers try "
                       "it now\n" % ids[2])
    assert ready_ids(env) == [ids[2]]
    assert env.r("ZCARD", env.key("retry")) == 3

    # Not waiting for a retry any more: a clear error, nothing moved.
    res = env.ctl("queue", "retry", ids[2])
    assert res.rc == 1, res
    assert "message %s is not waiting for a retry: it is ready or in flight" % ids[2] in res.err
    assert ready_ids(env) == [ids[2]]

    doc = env.ctl("--json", "queue", "retry", "--all").json()
    assert doc == {"moved": 3}
    assert ready_ids(env) == [ids[2], ids[0], ids[1], ids[3]]
    assert env.r("ZCARD", env.key("retry")) == 0
    res = env.ctl("queue", "retry", "--all")
    assert res.rc == 0 and res.out == "moved 0 messages from the retry set to the ready stream\n"


def test_retry_errors(env):
    res = env.ctl("queue", "retry", "01a225c7be711283c366c7")
    assert res.rc == 1, res
    assert res.err == "mailferryctl: no such message: 01a225c7be711283c366c7\n"
    d = queue_id()
    dead_msg(env, d)
    res = env.ctl("queue", "retry", d)
    assert res.rc == 1, res
    assert "every recipient is final" in res.err and "dead requeue %s" % d in res.err
    assert env.r("XLEN", env.key("ready")) == 0


def test_retry_all_in_batches(env):
    # More members than one script call moves (500).
    now = now_ms()
    args = []
    for i in range(1203):
        args += [str(now + i), "m%04d" % i]
    env.r("ZADD", env.key("retry"), *args)
    res = env.ctl("queue", "retry", "--all")
    assert res.rc == 0, res
    assert res.out == "moved 1203 messages from the retry set to the ready stream\n"
    assert env.r("XLEN", env.key("ready")) == 1203
    assert ready_ids(env)[:3] == ["m0000", "m0001", "m0002"]


# -- dead list ----------------------------------------------------------------

def test_dead_list(env):
    res = env.ctl("dead", "list")
    assert res.rc == 0 and "(no dead messages)" in res.out, res
    a, b, c = queue_id(), queue_id(), queue_id()
    dead_msg(env, a)
    dead_msg(env, b, sender="bounce@x.test")
    add_dead(env.r, env.prefix, c, "s@x.test", "bounce failed: too large")   # hash gone

    doc = env.ctl("--json", "dead", "list").json()
    assert doc["total"] == 3 and doc["truncated"] is False
    got = [(e["id"], e["from"], e["message"]) for e in doc["entries"]]
    assert got == [(c, "s@x.test", False), (b, "bounce@x.test", True), (a, "", True)]
    assert doc["entries"][0]["reason"] == "bounce failed: too large"

    res = env.ctl("dead", "list")
    rows = parse_rows(res.out, "TIME")
    assert [row[2:5] for row in rows] == [[c, "s@x.test", "gone"], [b, "bounce@x.test", "kept"],
                                          [a, "<>", "kept"]]
    assert rows[0][5:] == ["bounce", "failed:", "too", "large"]

    doc = env.ctl("dead", "list", "--limit", "2", "--json").json()
    assert [e["id"] for e in doc["entries"]] == [c, b] and doc["truncated"] is True
    assert "(newest 1 of 3 shown: use --limit)" in env.ctl("dead", "list", "--limit=1").out
    res = env.ctl("dead", "list", "--limit", "-1")
    assert res.rc == 2 and "--limit" in res.err


# -- dead requeue -------------------------------------------------------------

def test_dead_requeue_one(env):
    d = queue_id()
    dead_msg(env, d)
    before = hgetall(env.r, env.key("msg:" + d))
    res = env.ctl("dead", "requeue", d)
    assert res.rc == 0, res
    assert res.out == ("message %s requeued: 1 failed recipient reset to pending; routers try "
                       "it now\n" % d)
    after = hgetall(env.r, env.key("msg:" + d))
    st0 = json.loads(after["st:0"])
    old0 = json.loads(before["st:0"])
    assert st0["s"] == "pending" and "b" not in st0
    # The history of the failure is kept.
    assert {k: v for k, v in st0.items() if k != "s"} == \
        {k: v for k, v in old0.items() if k not in ("s", "b")}
    assert after["st:1"] == before["st:1"]          # the delivered recipient is untouched
    for f in ("from", "rcpts", "data", "created", "attempts"):
        assert after[f] == before[f]
    assert abs(int(after["next_attempt"]) - now_ms()) < 60000
    assert ready_ids(env) == [d]
    assert env.r("XLEN", env.key("dead")) == 0

    # Now it is queued: requeueing again is refused.
    res = env.ctl("dead", "requeue", d)
    assert res.rc == 1, res
    assert "message %s is still queued" % d in res.err
    assert ready_ids(env) == [d]


def test_dead_requeue_errors(env):
    res = env.ctl("dead", "requeue", "01a225c7be711283c366c7")
    assert res.rc == 1, res
    assert res.err == "mailferryctl: no such message: 01a225c7be711283c366c7\n"
    gone = queue_id()
    add_dead(env.r, env.prefix, gone, "")
    res = env.ctl("dead", "requeue", gone)
    assert res.rc == 1, res
    assert "no such message: %s (its dead entry remains" % gone in res.err
    assert env.r("XLEN", env.key("dead")) == 1
    # Every recipient delivered: nothing to requeue.
    done = queue_id()
    t = now_ms()
    write_msg(env.r, env.prefix, done, "a@x.test", ["r@x.test"], t,
              states={0: rcpt_state("delivered", 250, "2.0.0", "Ok", "relay", "", t, 1)})
    res = env.ctl("dead", "requeue", done)
    assert res.rc == 1 and "has no failed recipient" in res.err, res
    assert env.r("XLEN", env.key("ready")) == 0


def test_dead_requeue_all(env):
    a, b, gone = queue_id(), queue_id(), queue_id()
    dead_msg(env, a)
    dead_msg(env, b, sender="s@x.test")
    add_dead(env.r, env.prefix, a, "")          # a second entry for the same message
    add_dead(env.r, env.prefix, gone, "")
    doc = env.ctl("--json", "dead", "requeue", "--all").json()
    assert doc == {"requeued": 2, "recipients_reset": 2, "gone": 1, "skipped": 0}
    assert sorted(ready_ids(env)) == sorted([a, b])     # each message once
    assert [e["id"] for e in dead_ids(env)] == [gone]
    res = env.ctl("dead", "requeue", "--all")
    assert res.rc == 0, res
    assert res.out.startswith("requeued 0 messages (0 failed recipients reset to pending); "
                              "1 dead message gone")


def test_dead_requeue_warns_about_expiry(redis, tmp_path):
    prefix = "ctlexp:"
    config = write_config(tmp_path / "exp.conf", redis.port, prefix,
                          "[router]\nmax_queue_lifetime = 3600\n")
    r = redis.client()
    try:
        qid = queue_id()
        t = now_ms()
        write_msg(r, prefix, qid, "", ["x@x.test"], t - 2 * HOUR_MS,
                  states={0: rcpt_state("failed", 0, "", "expired", "relay", "", t, 3, b=True)})
        add_dead(r, prefix, qid, "")
        res = run_ctl(["dead", "requeue", qid], config=config)
        assert res.rc == 0, res
        assert "warning: message %s is older than [router] max_queue_lifetime" % qid in res.err
    finally:
        r.close()


# -- route suspend / resume -----------------------------------------------------

def test_route_suspend_and_resume(env):
    res = env.ctl("route", "suspend", "Relay")
    assert res.rc == 0, res
    assert res.out.startswith("route relay suspended: route.relay.enabled = no (live); "
                              "within 1000 ms")
    assert env.policy_hash() == {"route.relay.enabled": "no"}
    assert parse_table(env.ctl("policy", "get", "route.relay.enabled").out) == {
        "route.relay.enabled": ("no", "live")}
    # Suspending twice changes nothing.
    res = env.ctl("route", "suspend", "relay")
    assert res.rc == 0, res
    assert res.out == "route relay was suspended already: route.relay.enabled = no (live)\n"
    assert env.policy_hash() == {"route.relay.enabled": "no"}
    assert env.ctl("--json", "route", "suspend", "relay").json()["changed"] is False

    res = env.ctl("route", "resume", "relay")
    assert res.rc == 0, res
    assert res.out == ("route relay resumed: route.relay.enabled = yes (default value); "
                       "routers use it again within 1000 ms\n")
    assert env.policy_hash() == {}
    res = env.ctl("route", "resume", "relay")
    assert res.rc == 0, res
    assert res.out == "route relay was not suspended: route.relay.enabled = yes (default value)\n"

    doc = env.ctl("--json", "route", "suspend", "api").json()
    assert doc == {"route": "api", "enabled": False, "source": "live", "changed": True,
                   "applied_within_ms": 1000}
    doc = env.ctl("route", "resume", "api", "--json").json()
    assert doc["enabled"] is True and doc["source"] == "default" and doc["changed"] is True


def test_route_unknown_and_broken_policy(env):
    res = env.ctl("route", "suspend", "mars")
    assert res.rc == 2, res
    assert res.err == ('mailferryctl: no route named "mars" (routes in the configuration '
                       'file: relay, api)\n')
    assert env.policy_hash() == {}
    res = env.ctl("route", "resume", "relay.cap")
    assert res.rc == 2, res
    # Suspending the last enabled route through a pin is still valid policy;
    # a broken live field blocks the change like any policy set.
    env.r("HSET", env.key("policy"), "route.api.cap_day", "many")
    res = env.ctl("route", "suspend", "relay")
    assert res.rc == 2, res
    assert "route.api.cap_day" in res.err
    assert env.policy_hash() == {"route.api.cap_day": "many"}


def test_route_resume_when_the_file_disables_it(redis, tmp_path):
    config = write_config(tmp_path / "off.conf", redis.port, "ctloff:",
                          "[route spare]\ntransport = smtp\nhost = 127.0.0.1:3\ntls = none\n"
                          "enabled = no\n")
    res = run_ctl(["route", "resume", "spare"], config=config)
    assert res.rc == 0, res
    assert res.out.startswith("route spare stays disabled: there was no live override, but "
                              "the configuration file sets route.spare.enabled = no")
    doc = run_ctl(["--json", "route", "resume", "spare"], config=config).json()
    assert doc["enabled"] is False and doc["source"] == "file"


# -- stats --------------------------------------------------------------------

def window_key(env, route, now, window_ms=3600 * 1000):
    bms = max(window_ms // 12, 60000)
    return env.key("win:%s:%d:%d" % (route, bms, now // bms))


def test_stats_empty(env):
    res = env.ctl("stats")
    assert res.rc == 0, res
    rows = {r[0]: r for r in parse_rows(res.out, "ROUTE")}
    assert rows["relay"][1:4] == ["enabled", "unknown", "closed"]
    assert rows["relay"][4:] == ["0", "-", "0", "0"]
    assert "split.default = none" in res.out
    doc = env.ctl("stats", "--json").json()
    assert set(doc["routes"]) == {"relay", "api"}
    relay = doc["routes"]["relay"]
    assert relay["health"] is None and relay["breaker"]["state"] == "closed"
    assert relay["window"]["sent"] == 0 and relay["window"]["bounce"]["rate"] is None
    assert relay["caps"]["minute"] == {"used": 0, "cap": None}
    assert doc["held"] == 0 and doc["hours"] == 2


def test_stats_routes_rates_breakers_caps(env):
    r, k = env.r, env.key
    now = now_ms()
    hour = now // HOUR_MS
    r("HSET", k("stats:relay:%d" % hour), "delivered", "90", "deferred", "4", "bounced", "6")
    r("HSET", k("stats:relay:%d" % (hour - 1)), "delivered", "30")
    r("HSET", k("stats:relay:%d" % (hour - 2)), "delivered", "1000")
    r("HSET", k("stats:api:%d" % hour), "delivered", "40", "bounced", "1")
    r("HSET", k("stats:hold:%d" % hour), "held", "7")
    # relay's window: 200 outcomes, 12 bounced (6% > 5%), 10 deferred.
    r("HSET", window_key(env, "relay", now), "sent", "150", "bounced", "12", "deferred", "10")
    bms = 300000
    r("HSET", env.key("win:relay:%d:%d" % (bms, now // bms - 3)), "sent", "50")
    # Outside the one-hour window: ignored.
    r("HSET", env.key("win:relay:%d:%d" % (bms, now // bms - 12)), "sent", "999", "bounced",
      "999")
    r("HSET", window_key(env, "api", now), "sent", "10", "bounced", "5")
    r("SET", k("brk:relay"), "state=open since=%d cooldown=0 trips=2 cause=bounce" % (now - 60000))
    r("HSET", k("health:api"), "healthy", "0", "why", "connect refused", "t", str(now - 5000),
      "router", "r1")
    r("HSET", k("health:relay"), "healthy", "1", "why", "ok", "t", str(now - 5000),
      "router", "r1")
    r("SET", k("cnt:relay:m:%d" % (now // 60000)), "7")
    r("SET", k("cnt:relay:h:%d" % (now // HOUR_MS)), "130")
    r("SET", k("cnt:relay:d:%d" % (now // 86400000)), "500")
    assert env.ctl("policy", "set", "route.relay.cap_minute", "10", "route.relay.cap_day",
                   "500", "split.default", "relay:75,api:25").rc == 0
    assert env.ctl("route", "suspend", "api").rc == 0

    doc = env.ctl("--json", "stats").json()
    assert doc["split_default"] == "relay:75,api:25" and doc["held"] == 7
    relay, api = doc["routes"]["relay"], doc["routes"]["api"]
    assert relay["recipients"] == {"delivered": 120, "deferred": 4, "bounced": 6, "share": 75.0}
    assert api["recipients"]["share"] == 25.0 and api["enabled"] is False
    w = relay["window"]
    assert (w["sent"], w["bounced"], w["deferred"], w["judged"]) == (200, 12, 10, True)
    assert w["bounce"] == {"rate": 0.06, "max": 0.05, "over": True}
    assert w["deferral"] == {"rate": 0.05, "max": 0.3, "over": False}
    # api: a 50% bounce rate, but too few outcomes to judge.
    assert api["window"]["judged"] is False and api["window"]["bounce"]["over"] is False
    assert relay["breaker"]["state"] == "open" and relay["breaker"]["cause"] == "bounce"
    assert relay["breaker"]["trips"] == 2
    assert relay["breaker"]["probe_at_ms"] == now - 60000 + 300000
    assert api["health"] == {"healthy": False, "why": "connect refused", "since_ms": now - 5000,
                             "router": "r1"}
    assert relay["caps"]["minute"] == {"used": 7, "cap": 10}
    assert relay["caps"]["hour"] == {"used": 130, "cap": None}
    assert relay["caps"]["day"] == {"used": 500, "cap": 500}

    res = env.ctl("stats")
    assert res.rc == 0, res
    rows = {r[0]: r for r in parse_rows(res.out, "ROUTE")}
    assert rows["relay"][1:4] == ["enabled", "healthy", "open(bounce)"]
    assert rows["relay"][4:] == ["120", "75.0%", "4", "6"]
    assert rows["api"][1:3] == ["suspended", "down"]
    assert rows["total"][1:] == ["160", "100.0%", "4", "7"]
    assert "held by the policy: 7 groups" in res.out
    assert "relay: breaker open since" in res.out and "probing starts in 3m5" in res.out
    assert "api: down since" in res.out and "connect refused" in res.out
    rates = [ln.split() for ln in res.out.splitlines() if ln.startswith(("relay ", "api "))]
    assert ["relay", "1h00m", "200", "judged", "6.0%/5.0%", "!", "5.0%/30.0%", "0.00%/0.30%"] \
        in rates
    assert ["api", "1h00m", "10", "10/100", "50.0%/5.0%", "0.00%/30.0%", "0.00%/0.30%"] in rates
    caps = [ln.split() for ln in res.out.splitlines() if ln.startswith("relay ")][-1]
    assert caps == ["relay", "7/10", "130/-", "500/500", "full"]

    # --hours: only the current hour.
    doc = env.ctl("--json", "stats", "--hours", "1").json()
    assert doc["routes"]["relay"]["recipients"]["delivered"] == 90
    doc = env.ctl("--json", "stats", "--hours=3").json()
    assert doc["routes"]["relay"]["recipients"]["delivered"] == 1120


def test_stats_live_thresholds_and_warmup(env):
    now = now_ms()
    env.r("HSET", window_key(env, "relay", now, 600 * 1000), "sent", "20", "bounced", "3")
    assert env.ctl("policy", "set", "route.relay.window", "10m", "route.relay.min_samples",
                   "20", "route.relay.bounce_rate_max", "10%").rc == 0
    day = time.strftime("%Y-%m-%d", time.gmtime(now / 1000 - 86400))
    assert env.ctl("policy", "set", "route.relay.warmup_start", day,
                   "route.relay.warmup_caps", "50,100,200").rc == 0
    doc = env.ctl("--json", "stats").json()
    w = doc["routes"]["relay"]["window"]
    assert (w["window_ms"], w["bucket_ms"], w["min_samples"]) == (600000, 60000, 20)
    assert w["judged"] is True and w["bounce"] == {"rate": 0.15, "max": 0.1, "over": True}
    caps = doc["routes"]["relay"]["caps"]
    assert caps["warmup_day"] == 2 and caps["day"]["cap"] == 100
    assert "(warm-up day 2)" in env.ctl("stats").out


def test_stats_bad_hours(env):
    for v in ("0", "49", "x"):
        res = env.ctl("stats", "--hours", v)
        assert res.rc == 2 and "--hours: bad value" in res.err, res


def test_stats_with_rejected_live_policy(env):
    env.r("HSET", env.key("policy"), "route.relay.cap_minute", "lots")
    res = env.ctl("--json", "stats")
    assert res.rc == 0, res
    assert "warning: routers reject the live overrides" in res.err
    assert res.json()["routes"]["relay"]["caps"]["minute"]["cap"] is None


# -- every command's JSON is valid with odd bytes ---------------------------------

def test_json_with_binary_fields(env):
    qid = queue_id()
    write_msg(env.r, env.prefix, qid, b"\xffodd@x.test", ["r@x.test"], now_ms())
    env.r("XADD", env.key("ready"), "*", "id", qid)
    add_dead(env.r, env.prefix, qid, b"\xffodd@x.test", b"reason \xfe")
    for args in (["queue", "list"], ["queue", "show", qid], ["dead", "list"]):
        res = env.ctl("--json", *args)
        assert res.rc == 0, (args, res)
        json.loads(res.out)


# -- against a running router ---------------------------------------------------
#
# A real `mailferry all` (router_env) with recording MX servers writes the
# state; mailferryctl reads and changes it, and the router acts on the
# changes. retry_schedule is long, so nothing is retried unless asked.

from router_env import RouterEnv, wait_until  # noqa: E402
from router_env import renv  # noqa: E402,F401 (the fixture of the tests below)

E2E_MSG = b"From: <a@x.test>\r\nSubject: ctl\r\n\r\nbody\r\n"


def e2e_setup(renv, **primary):
    mx1 = renv.mx("primary")
    mx2 = renv.mx("overflow")
    routes = {"primary": RouterEnv.smtp_route(mx1, 10, **primary),
              "overflow": RouterEnv.smtp_route(mx2, 20)}
    cfg = renv.config("all", routes, router={"retry_schedule": "300"})
    mf = renv.start("all", "all", cfg)
    return mx1, mx2, cfg, mf


def test_e2e_queue_and_dead_commands(renv):
    mx1, _mx2, cfg, mf = e2e_setup(renv)
    ctl = lambda *a: run_ctl(a, config=cfg)
    m1 = renv.submit("a@x.test", ["ok@x.test", "tempfail-1@x.test"], E2E_MSG)
    m2 = renv.submit("", ["perm@x.test"], E2E_MSG)
    wait_until(lambda: renv.redis("ZCARD", renv.key("retry")) == 1, 10, "m1 in retry",
               diag=renv.diag)
    wait_until(lambda: renv.xlen("dead") == 1, 10, "m2 dead", diag=renv.diag)

    doc = ctl("--json", "queue", "list").json()
    assert [(m["id"], m["where"], m["pending"], m["rcpts"], m["last_route"])
            for m in doc["messages"]] == [(m1, "retry", 1, 2, "primary")]
    assert [m["id"] for m in ctl("--json", "queue", "list", "--route", "primary")
            .json()["messages"]] == [m1]
    assert ctl("--json", "queue", "list", "--route", "overflow").json()["messages"] == []

    doc = ctl("--json", "queue", "show", m1).json()
    assert doc["status"]["where"] == "retry"
    assert [(r["rcpt"], r["state"], r["code"]) for r in doc["recipients"]] == [
        ("ok@x.test", "delivered", 250), ("tempfail-1@x.test", "deferred", 451)]
    assert sorted((h["rcpt"], h["result"], h["route"]) for h in doc["history"]) == [
        ("ok@x.test", "delivered", "primary"), ("tempfail-1@x.test", "deferred", "primary")]
    assert doc["attempts"] == 1 and doc["history_complete"] is True

    # retry: the router tries again at once; the recipient now succeeds.
    assert ctl("queue", "retry", m1).rc == 0
    wait_until(lambda: renv.msg(m1) == {}, 10, "m1 delivered after the retry", diag=renv.diag)
    assert [t["code"] for t in mx1.rcpt_tries("tempfail-1@x.test")] == [451, 250]
    res = ctl("queue", "show", m1)
    assert res.rc == 1 and "no such message" in res.err, res

    # dead: listed; requeued, the router tries it again and it fails again.
    doc = ctl("--json", "dead", "list").json()
    assert [(e["id"], e["from"], e["message"]) for e in doc["entries"]] == [(m2, "", True)]
    doc = ctl("--json", "queue", "show", m2).json()
    assert doc["status"]["where"] == "dead"
    assert doc["recipients"][0]["state"] == "failed" and doc["recipients"][0]["bounced"] is True
    first_entry = doc["status"]["dead_entry"]
    res = ctl("dead", "requeue", m2)
    assert res.rc == 0, res
    wait_until(lambda: len(mx1.rcpt_tries("perm@x.test")) == 2, 10, "the requeued attempt",
               diag=renv.diag)
    wait_until(lambda: renv.xlen("dead") == 1 and renv.ready_pending() == 0, 10,
               "m2 dead again", diag=renv.diag)
    doc = ctl("--json", "queue", "show", m2).json()
    assert doc["status"]["where"] == "dead" and doc["status"]["dead_entry"] != first_entry
    assert doc["recipients"][0]["attempts"] == 2
    assert len([h for h in doc["history"] if h["result"] == "failed"]) == 2

    # delete: the message and its dead entry go.
    assert ctl("queue", "delete", m2).rc == 0
    assert renv.msg(m2) == {} and renv.xlen("dead") == 0
    assert ctl("dead", "list").out.strip().endswith("(no dead messages)")

    doc = ctl("--json", "stats").json()
    prim = doc["routes"]["primary"]
    assert prim["recipients"]["delivered"] == 2 and prim["recipients"]["bounced"] == 2
    assert prim["recipients"]["deferred"] == 1
    assert prim["window"]["sent"] == 5 and prim["window"]["bounced"] == 2
    assert prim["caps"]["minute"]["used"] >= 4
    # The router records each route's health when it starts.
    assert prim["health"]["healthy"] is True and prim["health"]["router"] == "r1"
    assert doc["routes"]["overflow"]["health"]["healthy"] is True


def test_e2e_delete_and_retry_all(renv):
    mx1, _mx2, cfg, mf = e2e_setup(renv)
    ctl = lambda *a: run_ctl(a, config=cfg)
    rcpts = ["tempfail-1@d%d.test" % i for i in range(3)]
    ids = [renv.submit("a@x.test", [rc], E2E_MSG) for rc in rcpts]
    wait_until(lambda: renv.redis("ZCARD", renv.key("retry")) == 3, 10, "three in retry",
               diag=renv.diag)
    res = ctl("queue", "delete", ids[0])
    assert res.rc == 0, res
    assert renv.msg(ids[0]) == {}
    assert ctl("--json", "queue", "retry", "--all").json() == {"moved": 2}
    renv.wait_idle(timeout=10)
    assert [len(mx1.to(rc)) for rc in rcpts] == [0, 1, 1]
    assert ctl("--json", "queue", "list").json()["messages"] == []
    # The deleted message was never tried again.
    assert len(renv.events(ids[0])) == 1


def test_e2e_route_suspend_and_resume(renv):
    mx1, mx2, cfg, mf = e2e_setup(renv)
    ctl = lambda *a: run_ctl(a, config=cfg)
    res = ctl("route", "suspend", "primary")
    assert res.rc == 0, res
    mf.wait_log(r"event=policy_applied overrides=1", timeout=10)
    q = renv.submit("a@x.test", ["one@x.test"], E2E_MSG)
    wait_until(lambda: mx2.to("one@x.test"), 10, "delivery via overflow", diag=renv.diag)
    assert mx1.count() == 0
    ev = renv.events(q)
    assert [(e["route"], e["reason"]) for e in ev] == [("overflow", "overflow:disabled")]
    assert ctl("--json", "stats").json()["routes"]["primary"]["enabled"] is False

    assert ctl("route", "resume", "primary").rc == 0
    mf.wait_log(r"event=policy_applied overrides=0", timeout=10, count=2)
    renv.submit("a@x.test", ["two@x.test"], E2E_MSG)
    wait_until(lambda: mx1.to("two@x.test"), 10, "delivery via primary", diag=renv.diag)
    stats = ctl("--json", "stats").json()["routes"]
    assert stats["primary"]["enabled"] is True
    assert stats["primary"]["recipients"]["share"] == 50.0
