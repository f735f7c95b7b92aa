"""Node addresses and client settings: parsing, validation, and passwords that never show."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta

import pytest

from veritas_resilience.postgres import FailoverClient, Node, nodes_from_dsn
from veritas_resilience.postgres._config import coerce_nodes
from veritas_resilience.postgres._settings import ClientSettings

SECRET = "s3cr3t-pw"


def test_node_defaults_its_name_to_host_and_port() -> None:
    """A node is named host:port (bracketed for IPv6) unless named explicitly."""
    assert Node(host="db1").name == "db1:5432"
    assert Node(host="::1", port=6000).name == "[::1]:6000"
    assert Node(host="db1", name="primary").name == "primary"


@pytest.mark.parametrize("port", [0, 70000, "5432", True])
def test_node_rejects_bad_ports(port: object) -> None:
    """A port outside 1..65535 (or not an int) is refused, naming the field."""
    with pytest.raises(ValueError, match="port"):
        Node(host="db1", port=port)  # type: ignore[arg-type]


def test_multi_host_dsn_splits_into_nodes_keeping_credentials() -> None:
    """postgresql://u:pw@h1:p1,h2:p2/db gives one single-host DSN per node, in order."""
    nodes = nodes_from_dsn(
        f"postgresql://app:{SECRET}@db1:5432,db2:5433/orders"
        "?sslmode=disable&target_session_attrs=read-write"
    )
    assert [(n.host, n.port, n.name) for n in nodes] == [("db1", 5432, "db1:5432"),
                                                           ("db2", 5433, "db2:5433")]  # fmt: skip
    assert nodes[1].dsn == f"postgresql://app:{SECRET}@db2:5433/orders?sslmode=disable"


def test_dsn_without_port_and_with_ipv6() -> None:
    """A host without a port gets 5432; an IPv6 host keeps its brackets in the DSN."""
    a, b = nodes_from_dsn("postgres://u@db1,[::1]:6000/x")
    assert (a.host, a.port) == ("db1", 5432)
    assert (b.host, b.port) == ("::1", 6000) and b.dsn == "postgres://u@[::1]:6000/x"


def test_node_repr_and_errors_never_show_the_password() -> None:
    """The DSN is left out of repr, and parsing errors do not echo it."""
    node = Node.from_dsn(f"postgresql://app:{SECRET}@db1/app")
    assert SECRET not in repr(node)
    with pytest.raises(ValueError) as info:
        nodes_from_dsn(f"mysql://app:{SECRET}@db1/app")
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError) as info:
        nodes_from_dsn(f"postgresql://app:{SECRET}@db1:notaport/app")
    assert SECRET not in str(info.value)


def test_single_host_constructor_refuses_several_hosts() -> None:
    """Node.from_dsn takes one host; nodes_from_dsn is for lists."""
    with pytest.raises(ValueError, match="nodes_from_dsn"):
        Node.from_dsn("postgresql://u@db1,db2/x")


def test_coerce_accepts_every_form_and_refuses_duplicates() -> None:
    """Nodes come as Node objects, DSNs or (host, port); names must be unique."""
    nodes = coerce_nodes([Node(host="a"), "postgresql://u@b:1/x", ("c", 2)])
    assert [n.name for n in nodes] == ["a:5432", "b:1", "c:2"]
    assert [n.name for n in coerce_nodes("postgresql://u@a,b/x")] == ["a:5432", "b:5432"]
    with pytest.raises(ValueError, match="unique"):
        coerce_nodes([("a", 1), ("a", 1)])
    with pytest.raises(ValueError, match="at least one"):
        coerce_nodes([])
    with pytest.raises(ValueError, match="nodes must hold"):
        coerce_nodes([42])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("command_timeout", 0),
        ("connect_timeout", -1),
        ("failover_timeout", float("inf")),
        ("max_size", 0),
        ("min_size", -1),
        ("fall", 0),
        ("rise", 0),
        ("max_lag_bytes", -5),
        ("read_route", "anywhere"),
        ("monitor_interval", 0),
        ("ryw_timeout", 0),
    ],
)
def test_client_validates_settings_naming_the_field(option: str, value: object) -> None:
    """A setting out of range raises ValueError at construction, naming the setting."""
    with pytest.raises(ValueError, match=option):
        FailoverClient([("db1", 5432)], **{option: value})  # type: ignore[arg-type]


def test_client_refuses_breaker_options_it_sets_itself() -> None:
    """The client decides what a node failure is; breaker_options cannot override it."""
    with pytest.raises(ValueError, match="failure_on"):
        FailoverClient([("db1", 5432)], breaker_options={"failure_on": Exception})


def test_connect_kwargs_cannot_override_what_the_client_sets() -> None:
    """connect_kwargs takes asyncpg's other options, not the ones the client manages."""
    with pytest.raises(ValueError, match="command_timeout"):
        FailoverClient([("db1", 5432)], connect_kwargs={"command_timeout": None})
    FailoverClient([("db1", 5432)], connect_kwargs={"statement_cache_size": 0})


def test_min_size_cannot_exceed_max_size() -> None:
    """min_size > max_size is refused."""
    with pytest.raises(ValueError, match="min_size"):
        FailoverClient([("db1", 5432)], min_size=5, max_size=2)


def test_client_repr_names_nodes_without_secrets() -> None:
    """repr shows node names and state, never the DSN or password."""
    client = FailoverClient(
        [f"postgresql://app:{SECRET}@db1/app", ("db2", 5432)], name="orders", password=SECRET
    )
    text = repr(client)
    assert "db1:5432" in text and "db2:5432" in text and SECRET not in text
    assert SECRET not in repr(client._connect) + repr(client._runtimes)
    assert client.nodes[0].name == "db1:5432"
    assert client.primary is None


def test_every_client_keyword_is_a_validated_setting_with_the_same_default() -> None:
    """FailoverClient's keywords (but nodes, clock, hooks) are exactly ClientSettings' fields,
    with the same defaults: the settings object validates every one of them."""
    params = inspect.signature(FailoverClient.__init__).parameters
    keywords = {
        n: p.default for n, p in params.items() if n not in ("self", "nodes", "clock", "hooks")
    }
    fields = {f.name: f.default for f in dataclasses.fields(ClientSettings)}
    assert keywords == fields
    # The client passes its keywords through as given: a timedelta becomes seconds here.
    late = timedelta(milliseconds=1500)
    settings = ClientSettings(connect_timeout=late, server_settings={"a": "b"})  # type: ignore[arg-type]
    assert settings.connect_timeout == 1.5
    assert settings.server_settings == {"application_name": "postgres", "a": "b"}
    assert settings.breaker_options == {"failure_threshold": 5, "reset_timeout": 2.0}
    with pytest.raises(ValueError, match="release_timeout"):
        ClientSettings(release_timeout=0)
