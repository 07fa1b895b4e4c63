"""A site of gateways on a real 3-node NATS JetStream cluster (nats-server 2.15, loopback).

So far (issue 17, first slice): joining the site, and the site's identity: every gateway of
a site gives a phone the same device token; a site that cannot be reached stops the start
with a reason instead of letting a gateway make tokens of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import nats
import pytest

from bench.lib.natscluster import NatsCluster
from gateway import certs, config
from gateway.cluster import SiteUnavailable
from gateway.cluster.site import connect, join, site_bucket
from gateway.service import Gateway, free_port
from tests.conftest import eventually, make_config, new_install, send


def site_key(directory) -> dict:
    """The site's key pair (from the vault, on an appliance): one pin for every gateway."""
    directory.mkdir(parents=True, exist_ok=True)
    certs.ensure_self_signed(directory / "cert.pem", directory / "key.pem", "site")
    return {"cert": str(directory / "cert.pem"), "key": str(directory / "key.pem")}


NO_SIP = {"sip": {"enabled": False}}  # these tests need no SIP port


def site_config(nats_cluster: NatsCluster, site: str, **extra) -> dict:
    return {"enabled": True, "site": site, "servers": nats_cluster.urls, "replicas": 3,
            "connect_timeout": 5.0, **extra}


async def test_every_gateway_of_a_site_gives_a_phone_the_same_token(
        nats_cluster, gateway_factory, devices, tmp_path):
    """Two gateways with state dirs (and token secrets) of their own join site ward3: the
    first one's secret becomes the site's, kept in an R3 KV bucket, and the same install
    gets the same token on both, over QUIC and TLS. A gateway of another site, or a box
    alone, gives another token."""
    key = site_key(tmp_path / "site-key")
    a = await gateway_factory(tmp_path / "a", cluster=site_config(nats_cluster, "ward3"),
                              tls=key)
    b = await gateway_factory(tmp_path / "b", cluster=site_config(nats_cluster, "ward3"),
                              tls=key)
    other = await gateway_factory(tmp_path / "c", cluster=site_config(nats_cluster, "ward4"))
    alone = await gateway_factory(tmp_path / "d")
    assert a.site is not None and b.site is not None
    assert a.site.created_secret and not b.site.created_secret
    install = new_install()
    tokens = []
    for gw, transport in ((a, "quic"), (b, "tls"), (b, "quic"), (other, "quic"),
                          (alone, "quic")):
        device = devices(gw, transport, install_id=install, reconnect=False)
        tokens.append(await device.welcome())
        await device.stop()
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[3] != tokens[0] and tokens[4] != tokens[0] and tokens[3] != tokens[4]
    info = await a.site.js.stream_info(f"KV_{site_bucket('ward3')}")
    assert info.config.num_replicas == 3
    shown = a.status()["cluster"]
    assert (shown["site"], shown["connected"], shown["servers_known"]) == ("ward3", True, 3)
    assert alone.status()["cluster"] is None
    assert a.pin == b.pin != other.pin


async def test_a_gateway_with_another_key_pair_is_refused(nats_cluster, gateway_factory,
                                                         tmp_path):
    """Every phone of a site checks one pin: a gateway whose key is not the site's would be
    refused by all of them, so it does not start, and says which key it needs."""
    await gateway_factory(tmp_path / "a", cluster=site_config(nats_cluster, "ward5"),
                          tls=site_key(tmp_path / "site-key"))
    with pytest.raises(SiteUnavailable, match="is not site ward5's"):
        await Gateway.start(make_config(tmp_path / "b",
                                        cluster=site_config(nats_cluster, "ward5")))


async def test_gateways_joining_at_once_agree_on_one_secret(nats_cluster):
    cfg = config.from_dict({**NO_SIP, "cluster": site_config(nats_cluster, "race")}).cluster
    sites = await asyncio.gather(*(join(cfg, bytes([i]) * 32, "sha256/same")
                                   for i in range(1, 5)))
    try:
        assert len({s.token_secret for s in sites}) == 1
        assert sum(s.created_secret for s in sites) == 1
        assert sites[0].token_secret in {bytes([i]) * 32 for i in range(1, 5)}
    finally:
        for s in sites:
            await s.close()


async def test_a_site_that_cannot_be_reached_stops_the_start(tmp_path, nats_cluster):
    """No NATS at the configured address: the start fails within the connect timeout with
    a reason, and the state it opened is closed again (a one-box start on it works)."""
    dead = f"nats://127.0.0.1:{free_port('127.0.0.1')}"
    cfg = make_config(tmp_path / "state", cluster={
        "enabled": True, "site": "ward3", "servers": [dead], "connect_timeout": 1.0})
    started = time.monotonic()
    with pytest.raises(SiteUnavailable, match="cannot reach the site's NATS"):
        await Gateway.start(cfg)
    assert time.monotonic() - started < 5
    alone = await Gateway.start(make_config(tmp_path / "state"))
    await alone.stop(drain=0.1)


async def test_the_nats_client_is_loaded_only_for_a_site():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, gateway.service, gateway.cli; "
                          "print('nats' in sys.modules)"], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(("data", "message"), [
    ({"enabled": True, "site": ""}, "cluster.site: a name of letters"),
    ({"enabled": True, "site": "ward 3"}, "cluster.site: a name of letters"),
    ({"enabled": True, "site": "w", "servers": ["http://x:1"]}, "is not nats://host:port"),
    ({"enabled": True, "site": "w", "servers": []}, "cluster.servers: at least one"),
    ({"enabled": True, "site": "w", "credentials_file": "/no/such.creds"},
     "cluster.credentials_file: cannot read"),
    ({"enabled": True, "site": "w", "replicas": 7}, "cluster.replicas: must be at most 5"),
])
def test_cluster_settings_are_checked(data, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({**NO_SIP, "cluster": data})


async def test_connect_names_every_server_it_tried():
    cfg = config.from_dict({**NO_SIP, "cluster": {
        "enabled": True, "site": "w", "connect_timeout": 0.5,
        "servers": [f"nats://127.0.0.1:{free_port('127.0.0.1')}"]}}).cluster
    with pytest.raises(SiteUnavailable, match=cfg.servers[0]):
        await connect(cfg)


async def test_the_site_knows_which_gateway_holds_a_phone(nats_cluster, gateway_factory,
                                                          devices, tmp_path):
    """A phone on A: the site's presence names A. The same install then connects to B
    while its old connection to A is still open (a phone that changed networks): B holds
    it, and when A's old connection ends A does not erase B's entry (its epoch is stale).
    A gateway that stops says so: its phones' entries and its own go."""
    key = site_key(tmp_path / "site-key")
    a = await gateway_factory(tmp_path / "a", cluster=site_config(nats_cluster, "ward6"),
                              tls=key)
    b = await gateway_factory(tmp_path / "b", cluster=site_config(nats_cluster, "ward6"),
                              tls=key)
    assert a.presence is not None and b.presence is not None
    install = new_install()
    on_a = devices(a, "quic", install_id=install, reconnect=False)
    token = await on_a.welcome()
    assert (await eventually(lambda: a.presence.holder(token)))[0] == a.gateway_id
    assert a.status()["cluster"]["held_here"] == 1
    on_b = devices(b, "tls", install_id=install, reconnect=False)
    assert await on_b.welcome() == token

    async def held_by_b():
        holder = await b.presence.holder(token)
        return holder is not None and holder[0] == b.gateway_id
    await eventually(held_by_b)
    await on_a.stop()  # A's old connection ends after the phone moved
    await eventually(lambda: a.metrics.value("lpgw_cluster_presence_moved_total") == 1)
    assert await held_by_b()
    assert set(await a.presence.gateways()) == {a.gateway_id, b.gateway_id}
    assert a.metrics.value("lpgw_cluster_connected") == 1
    assert a.metrics.value("lpgw_cluster_gateways") == len(a.presence.known) >= 1
    await b.stop(drain=0.1)  # graceful: B lets go of its phone and says it is gone

    async def b_gone():
        return b.gateway_id not in await a.presence.gateways() and \
            await a.presence.holder(token) is None
    await eventually(b_gone)


# --- the site's push stream (gateway/cluster/pushes.py) ----------------------------------

@pytest.fixture
async def streams(nats_cluster):
    """Push streams of sites of their own (queue bound as asked), deleted afterwards."""
    from gateway.cluster.pushes import SitePushes

    made = []

    async def make(queue_limit: int = 3) -> SitePushes:
        cfg = config.from_dict({**NO_SIP, "cluster": site_config(nats_cluster,
                                                       "s" + new_install()[:8])})
        site = await join(cfg.cluster, b"k" * 32, "sha256/x")
        pushes = SitePushes(site.nc, site.js, cfg.cluster.site, replicas=3, queue_limit=queue_limit)
        await pushes.open(10.0)
        made.append((site, pushes))
        return pushes

    yield make
    for site, pushes in made:
        with contextlib.suppress(Exception):
            await site.js.delete_stream(pushes.stream)
        await site.close()


@pytest.fixture
async def stream(streams):
    return await streams()


TOKEN_A, TOKEN_B = "a" * 64, "b" * 64


async def accept(stream, token: str, n: int, now: float, **kw):
    from gateway.records import StoredPush

    fields = {"push_id": kw.pop("push_id", new_install()), "push_type": "alert",
              "priority": 10, "expiration": int(now) + 3600,
              "collapse_id": kw.pop("collapse_id", None)}
    fields.update(kw)
    return await stream.accept(StoredPush(token=token, seq=0, payload_json=json.dumps(
        {"n": n}), accepted_at=now, **fields), now)


async def test_the_stream_keeps_pushes_as_apns_would(stream):
    """R3, acknowledged after a quorum; seq per device rises (with gaps); an apns-id sent
    again is kept once; the queue bound drops the oldest, over all the device's subjects,
    and says how many; a collapse id keeps the newest and says it replaced one; pushes
    with expiration 0 are outside the queue; an ack forgets what it covers for the whole
    site, and only for that device."""
    now = time.time()
    info = await stream.js.stream_info(stream.stream)
    assert info.config.num_replicas == 3 and info.cluster.leader
    first = await accept(stream, TOKEN_A, 1, now, push_id="9dbd5258-3151-4386-a404-"
                                                          "6870860f1cf0")
    again = await accept(stream, TOKEN_A, 1, now, push_id="9dbd5258-3151-4386-a404-"
                                                          "6870860f1cf0")
    assert (again.seq, first.duplicate, again.duplicate) == (first.seq, False, True)
    evicted = []
    for n in range(2, 6):  # 5 kept pushes in all: the bound (3) drops the two oldest
        evicted.append((await accept(stream, TOKEN_A, n, now)).evicted)
    assert evicted == [0, 0, 1, 1]
    for n in range(3):  # now or never: not in the queue, never backlog
        assert (await accept(stream, TOKEN_A, 50 + n, now, expiration=0)).evicted == 0
    await accept(stream, TOKEN_B, 100, now)
    # a new collapse id: its own subject, but the device's bound takes it in (3 drops)
    six = await accept(stream, TOKEN_A, 6, now, collapse_id="bed-12")
    seven = await accept(stream, TOKEN_A, 7, now, collapse_id="bed-12")  # replaces 6
    assert (six.evicted, six.collapsed, seven.evicted, seven.collapsed) == (1, 0, 0, 1)
    pending = await stream.pending_after(TOKEN_A, 0, now)
    assert [json.loads(p.payload_json)["n"] for p in pending] == [4, 5, 7]
    assert [p.seq for p in pending] == sorted(p.seq for p in pending)
    assert pending[-1].collapse_id == "bed-12"
    await stream.ack_through(TOKEN_A, pending[1].seq)
    assert [json.loads(p.payload_json)["n"]
            for p in await stream.pending_after(TOKEN_A, 0, now)] == [7]
    assert [json.loads(p.payload_json)["n"]
            for p in await stream.pending_after(TOKEN_B, 0, now)] == [100]


async def test_an_expired_push_is_never_handed_out(stream):
    now = time.time()
    await accept(stream, TOKEN_A, 1, now, expiration=int(now) + 1)
    await accept(stream, TOKEN_A, 2, now)
    assert len(await stream.pending_after(TOKEN_A, 0, now)) == 2
    later = now + 2.5
    assert [json.loads(p.payload_json)["n"]
            for p in await stream.pending_after(TOKEN_A, 0, later)] == [2]
    await asyncio.sleep(max(0.0, later - time.time()) + 0.5)  # and the server drops it
    info = await stream.js.stream_info(stream.stream)
    assert info.state.messages == 1


async def test_killing_the_stream_leader_loses_no_acknowledged_push(streams, nats_cluster):
    """SIGKILL of the node leading the push stream while pushes flow: writes stop for the
    Raft election (4.5-7 s here) and resume; every push JetStream acknowledged before,
    during or after is still there (by apns-id), read from the new leader."""
    import signal as signals

    from bench.lib.natscluster import READY_TIMEOUT

    stream = await streams(queue_limit=100_000)
    leader = (await stream.js.stream_info(stream.stream)).cluster.leader
    node = next(n for n in nats_cluster.nodes if n.name == leader)
    acked: dict[str, int] = {}
    failed = 0
    outage_from = outage_to = None
    started = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < 14 and (outage_to is None
                                                    or time.monotonic() - outage_to < 1.5):
            n += 1
            if n == 20:
                nats_cluster.kill(node, signals.SIGKILL)
                outage_from = time.monotonic()
            push_id = new_install()
            token = TOKEN_A if n % 2 else TOKEN_B
            try:
                await asyncio.wait_for(accept(stream, token, n, time.time(), push_id=push_id),
                                       2.0)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                failed += 1
                await asyncio.sleep(0.05)
                continue
            acked[push_id] = n
            if outage_from is not None and outage_to is None and failed:
                outage_to = time.monotonic()
            await asyncio.sleep(0.01)
    finally:
        nats_cluster.launch(node)
        nats_cluster.wait_ready(READY_TIMEOUT)
    assert outage_to is not None, "writes did not resume within 14 s"
    assert outage_to - outage_from < 12
    kept = {p.push_id for token in (TOKEN_A, TOKEN_B)
            for p in await stream.pending_after(token, 0, time.time(), limit=100_000)}
    assert set(acked) <= kept, f"{len(set(acked) - kept)} acknowledged pushes lost"
    assert failed > 0 and len(acked) >= 20
    print(f"leader {leader} killed: {len(acked)} acknowledged, {failed} refused, writes "
          f"back after {outage_to - outage_from:.1f} s; none lost")


async def test_a_damaged_site_secret_stops_the_start(nats_cluster):
    from gateway.cluster.site import SECRET_KEY, open_bucket

    cfg = config.from_dict({**NO_SIP, "cluster": site_config(nats_cluster, "damaged")}).cluster
    first = await join(cfg, b"k" * 32, "sha256/x")
    try:
        kv = await open_bucket(first.js, site_bucket("damaged"), 3, time.monotonic() + 5)
        await kv.put(SECRET_KEY, b"not hex at all")
        with pytest.raises(SiteUnavailable, match=r"token secret .* is damaged"):
            await join(cfg, b"k" * 32, "sha256/x")
    finally:
        await first.close()


async def test_a_flapping_phone_costs_few_presence_writes(nats_cluster, gateway_factory,
                                                          tmp_path):
    """100 arrivals and departures of one phone in a burst: only the newest state is
    written (a handful of writes, not 200), and it ends as it should: absent."""
    gw = await gateway_factory(tmp_path / "a", cluster=site_config(nats_cluster, "flap"))
    presence = gw.presence
    token = "c" * 64
    for _ in range(100):
        presence.arrived(token, "quic")
        presence.left(token)
    presence.arrived(token, "tls")

    async def written():
        holder = await presence.holder(token)
        return holder if holder is not None and not presence.status()["writes_waiting"] \
            else None
    _, revision = await eventually(written)
    presence.left(token)

    async def gone():
        return await presence.holder(token) is None and \
            not presence.status()["writes_waiting"]
    await eventually(gone)
    kv_info = await gw.site.js.stream_info("KV_lpgw_flap_presence")
    assert kv_info.state.last_seq < 10, kv_info.state.last_seq
    assert revision <= kv_info.state.last_seq


async def test_a_box_moving_into_a_site_keeps_its_phones_tokens(nats_cluster, gateway_factory,
                                                                devices, tmp_path):
    """`lpgw cluster import` carries a box into a site: its token secret and pin (a phone
    that had a token on the box gets the same one from a gateway of the site), its
    devices with their users, and the pushes still queued for them (which the phone gets,
    in order, from the site). A second run does nothing; importing another box into that
    site is refused: it would change every token."""
    import subprocess
    import sys

    import yaml

    key = site_key(tmp_path / "box-key")
    box = await gateway_factory(tmp_path / "box", tls=key)
    install = new_install()
    phone = devices(box, "quic", install_id=install, reconnect=False)
    token = await phone.welcome()
    await phone.stop()
    await eventually(lambda: not box.delivery.is_connected(token))
    from gateway.transport import control
    bound = await control.request(box.config.control_path,
                                  {"op": "bind", "token": token, "user": "alice"})
    assert bound["ok"], bound
    queued = [await send(box, token, {"n": n}) for n in range(3)]
    assert all(r["ok"] and r["stored"] for r in queued)
    await box.stop(drain=0.1)

    def import_site(state, **tls):
        cfg = tmp_path / f"{state}.yaml"
        cfg.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / state), "tls": tls, **NO_SIP,
            "cluster": site_config(nats_cluster, "moved")}))
        return subprocess.run([sys.executable, "-m", "gateway.cli", "cluster", "import",
                               "-c", str(cfg)], capture_output=True, text=True, timeout=60)

    done = import_site("box", **key)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert (said["outcome"], said["state"], said["devices"], said["pushes"]) == \
        ("imported", "imported", 1, 3)
    said = json.loads(import_site("box", **key).stdout)
    assert (said["outcome"], said["state"], said["pushes"]) == ("already", "already", 0)
    member = await gateway_factory(tmp_path / "member", tls=key,
                                   cluster=site_config(nats_cluster, "moved"))
    assert member.store.devices_of_user("alice") == [token]
    again = devices(member, "tls", install_id=install, reconnect=False)
    assert await again.welcome() == token
    got = [await again.next("push") for _ in queued]
    assert [p["id"] for p in got] == [r["push_id"] for r in queued]
    with pytest.raises(TimeoutError):
        await again.next("push", timeout=0.5)
    other = await gateway_factory(tmp_path / "other", tls=key)  # another box, same key
    await other.stop(drain=0.1)
    refused = import_site("other", **key)
    assert refused.returncode == 1 and "would change every device token" in refused.stderr


async def test_a_site_over_tls_to_nats(tmp_path, gateway_factory, devices):
    """TLS 1.3 between gateways and nats-servers, and between the nodes (routes verify each
    other), as the nats role configures it with nats_tls_*: a gateway with the site's CA
    (cluster.ca_file) joins and keeps a push; one with another CA, or without TLS, is
    refused at start, and says why."""
    from bench.lib.natscluster import make_tls

    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start(tls=True)
        assert all(url.startswith("tls://") for url in cluster.urls)
        site = {"enabled": True, "site": "secure", "servers": cluster.urls, "replicas": 3,
                "connect_timeout": 5.0, "ca_file": str(cluster.tls["ca"])}
        gw = await gateway_factory(tmp_path / "gw", cluster=site, **NO_SIP)
        assert gw.site.nc.connected_url.scheme == "tls"
        phone = devices(gw, "tls", reconnect=False)
        token = await phone.welcome()
        assert (await send(gw, token, {"n": 1}))["ok"]
        assert (await phone.next("push"))["payload"] == {"n": 1}

        stranger = make_tls(tmp_path / "other-ca", ["127.0.0.1"])
        wrong = config.from_dict({**NO_SIP, "cluster": {
            **site, "ca_file": str(stranger["ca"]), "connect_timeout": 1.0}}).cluster
        with pytest.raises(SiteUnavailable, match=r"cannot reach the site's NATS.*"
                                                  r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await join(wrong, b"k" * 32, "sha256/x")
        plain = config.from_dict({**NO_SIP, "cluster": {
            **site, "ca_file": "", "connect_timeout": 1.0,
            "servers": [u.replace("tls://", "nats://") for u in cluster.urls]}}).cluster
        with pytest.raises(SiteUnavailable, match="cannot reach the site's NATS"):
            await join(plain, b"k" * 32, "sha256/x")
    finally:
        cluster.stop()
