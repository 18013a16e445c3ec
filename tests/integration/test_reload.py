"""SIGHUP reloads the router's policy from the configuration file: changed
thresholds and pins apply to the next messages, live overrides stay on top,
and a file that changes the set of routes is refused (the running policy
stays), all without dropping the process or its connections."""
import signal

from router_env import renv, wait_until  # noqa: F401,F811
from test_router import SENDER, simple_msg, two_routes


def _send(renv, tag):
    rcpt = "reload-%s@x.test" % tag
    qid = renv.submit(SENDER, [rcpt], simple_msg(SENDER, rcpt, "reload %s" % tag))
    wait_until(lambda: renv.events(qid), 5, "outcome of %s" % qid, diag=renv.diag)
    e = renv.events(qid)
    assert len(e) == 1 and e[0]["result"] == "delivered", e
    return e[0]["route"], e[0]["reason"]


def test_sighup_reloads_policy_from_file(renv):
    mx1, mx2, routes = two_routes(renv)
    cfg = renv.config("all", routes)
    mf = renv.start("all", "all", cfg)
    assert _send(renv, "before") == ("primary", "primary")

    # The file now pins the recipient domain to the overflow route.
    renv.config("all", routes, policy={"pin.rcpt.x.test": "overflow"})
    mf.proc.send_signal(signal.SIGHUP)
    mf.wait_log(r"event=reload role=router result=ok", timeout=5)
    mf.wait_log(r"event=policy_applied", count=2, timeout=5)
    assert _send(renv, "pinned") == ("overflow", "pin:rcpt_domain")

    # A live override still wins over the reloaded file.
    renv.policy_set("pin.rcpt.x.test", "primary")
    mf.wait_log(r"event=policy_applied overrides=1\b", timeout=3)
    assert _send(renv, "live") == ("primary", "pin:rcpt_domain")
    renv.policy_del("pin.rcpt.x.test")
    # Third time with no overrides: at start, after the reload, now.
    mf.wait_log(r"event=policy_applied overrides=0\b", count=3, timeout=3)

    # A file that adds a route is refused; the policy in force stays.
    more = dict(routes)
    more["third"] = renv.smtp_route(mx2, 30)
    renv.config("all", more, policy={"pin.rcpt.x.test": "overflow"})
    mf.proc.send_signal(signal.SIGHUP)
    mf.wait_log(r"event=reload role=router result=fail", timeout=5)
    assert _send(renv, "after") == ("overflow", "pin:rcpt_domain")
    assert mf.alive()
    renv.wait_idle(timeout=10)
